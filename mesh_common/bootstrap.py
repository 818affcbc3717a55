"""The standalone sidecar config (``mesh-sidecar --config FILE``): validation into values.

Pure: takes the parsed YAML document, returns an immutable ``Bootstrap`` or raises
``ConfigError`` naming the field and the reason. Nothing is half-applied.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields
from typing import Any

from .limits import Limits
from .snapshot import Cluster, Endpoint, Snapshot
from .spiffe import SpiffeError, SpiffeId


class ConfigError(ValueError):
    """Invalid config: ``str(err)`` is ``<field>: <reason>``."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Bootstrap:
    service: str
    trust_domain: str
    cert_file: str
    key_file: str
    ca_file: str
    inbound: HostPort | None
    app: HostPort | None
    outbound: HostPort | None
    admin: HostPort
    limits: Limits
    snapshot: Snapshot

    @property
    def spiffe_id(self) -> str:
        return SpiffeId(self.trust_domain, self.service).uri


def parse_hostport(value: Any, where: str, *, loopback_only: bool = False) -> HostPort:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{where}: expected HOST:PORT, got {value!r}")
    host, _, port_s = value.rpartition(":")
    host = host.strip("[]")
    if not (port_s.isascii() and port_s.isdigit()) or not 0 <= int(port_s) <= 65535:
        raise ConfigError(f"{where}: port must be 0..65535, got {port_s!r}")
    if not host:
        raise ConfigError(f"{where}: missing host in {value!r}")
    if loopback_only:
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise ConfigError(f"{where}: must be a loopback address, got {host}")
        except ValueError:
            if host != "localhost":
                raise ConfigError(f"{where}: must be a loopback address, got {host}") from None
    return HostPort(host, int(port_s))


def _section(doc: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping")
    return value


def _str(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}{key}: required string")
    return value


def parse_limits(doc: Any) -> Limits:
    if doc is None:
        return Limits()
    if not isinstance(doc, dict):
        raise ConfigError("limits: expected a mapping")
    known = {f.name for f in fields(Limits)}
    for key in doc:
        if key not in known:
            raise ConfigError(f"limits.{key}: unknown limit (known: {', '.join(sorted(known))})")
    try:
        return Limits(**doc)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def parse_clusters(doc: Any, trust_domain: str) -> tuple[Cluster, ...]:
    if doc is None:
        return ()
    if not isinstance(doc, list):
        raise ConfigError("clusters: expected a list")
    out: list[Cluster] = []
    seen: set[str] = set()
    for i, c in enumerate(doc):
        where = f"clusters[{i}]"
        if not isinstance(c, dict):
            raise ConfigError(f"{where}: expected a mapping")
        name = _str(c, "name", f"{where}.")
        try:
            SpiffeId(trust_domain, name)
        except SpiffeError as exc:
            raise ConfigError(f"{where}.name: {exc}") from None
        if name in seen:
            raise ConfigError(f"{where}.name: duplicate cluster {name!r}")
        seen.add(name)
        eps_doc = c.get("endpoints", [])
        if not isinstance(eps_doc, list):
            raise ConfigError(f"{where}.endpoints: expected a list")
        eps: list[Endpoint] = []
        for j, e in enumerate(eps_doc):
            ewhere = f"{where}.endpoints[{j}]"
            if not isinstance(e, dict):
                raise ConfigError(f"{ewhere}: expected a mapping")
            hp = parse_hostport(e.get("address"), f"{ewhere}.address")
            if hp.port == 0:
                raise ConfigError(f"{ewhere}.address: port 0 is not an endpoint")
            sid = e.get("spiffe_id") or SpiffeId(trust_domain, name).uri
            try:
                SpiffeId.parse(sid)
            except SpiffeError as exc:
                raise ConfigError(f"{ewhere}.spiffe_id: {exc}") from None
            eps.append(Endpoint(hp.host, hp.port, sid))
        out.append(Cluster(name, tuple(eps)))
    return tuple(out)


def parse_bootstrap(doc: Any, *, require_tls: bool = True) -> Bootstrap:
    """Validate a whole config document.

    ``require_tls`` (standalone mode): the ``tls`` section names the certificate files. With
    ``require_tls=False`` (dynamic mode, ``--token``) the certificate comes from the control
    plane, so a ``tls`` section is an error and the ``*_file`` fields are empty.
    """
    if not isinstance(doc, dict):
        raise ConfigError("config: expected a mapping at the top level")
    known = {"service", "trust_domain", "tls", "inbound", "outbound", "admin", "clusters", "limits"}
    for key in doc:
        if key not in known:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(known))})")
    service = _str(doc, "service", "")
    trust_domain = doc.get("trust_domain", "mesh.local")
    try:
        SpiffeId(trust_domain, service)
    except SpiffeError as exc:
        raise ConfigError(f"service/trust_domain: {exc}") from None
    tls = _section(doc, "tls")
    if tls is None and require_tls:
        raise ConfigError("tls: required (cert, key, ca): the mesh speaks mTLS only")
    if tls is not None and not require_tls:
        raise ConfigError("tls: not allowed with a join token (the control plane issues "
                          "the certificate); remove it or run without --token")
    inbound = _section(doc, "inbound")
    in_listen = app = None
    if inbound is not None:
        in_listen = parse_hostport(inbound.get("listen", "127.0.0.1:15006"), "inbound.listen")
        app = parse_hostport(inbound.get("app"), "inbound.app", loopback_only=True)
    outbound = _section(doc, "outbound")
    out_listen = None
    if outbound is not None:
        out_listen = parse_hostport(outbound.get("listen", "127.0.0.1:15001"), "outbound.listen",
                                    loopback_only=True)
    admin = _section(doc, "admin") or {}
    admin_listen = parse_hostport(admin.get("listen", "127.0.0.1:15000"), "admin.listen",
                                  loopback_only=True)
    limits = parse_limits(doc.get("limits"))
    clusters = parse_clusters(doc.get("clusters"), trust_domain)
    return Bootstrap(
        service=service, trust_domain=trust_domain,
        cert_file=_str(tls, "cert", "tls.") if tls else "",
        key_file=_str(tls, "key", "tls.") if tls else "",
        ca_file=_str(tls, "ca", "tls.") if tls else "",
        inbound=in_listen, app=app, outbound=out_listen, admin=admin_listen,
        limits=limits, snapshot=Snapshot(version="static-1", clusters=clusters),
    )
