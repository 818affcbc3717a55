"""The gateway's YAML config: validated whole into an immutable ``GatewayConfig``, and watched
for changes (mtime polling): a file that fails validation is refused, logged, and the last
good config stays in force.

    max_body_bytes: 65536            # a larger request body -> 413
    issuers: [...]                   # bearer JWT issuers (see auth.parse_issuers)
    rate_limits:
      per_subject: {rps: 20, burst: 40}
      max_subjects: 10000            # subject buckets kept (least recently used evicted)
    routes:
      - name: get_order
        http: GET /v1/orders/{order_id}
        grpc: order.Order/GetOrder   # package.Service/Method (a unary method of PROTO_MODULES)
        query: []                    # query parameters accepted (request fields)
        body: false                  # POST/PUT/PATCH: the JSON body is the request
        timeout_s: 10                # the gRPC call's deadline (seconds)
        rate_limit: {rps: 100, burst: 200}   # per route (all subjects together); optional
        auth: true                   # a bearer token is required (default)
      - name: order_details          # composition: the parts are called in parallel
        http: GET /v1/orders/{order_id}/details
        compose: {order: order.Order/GetOrder, payment: payment.Payment/ListLedger}
        primary: order               # its failure fails the answer; the others' is reported

Parsing is pure (``parse_config(text, where)``); ``ConfigWatcher`` does the file I/O.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .routes import (
    HTTP_METHODS,
    Part,
    RateLimit,
    Route,
    RouteTable,
    parse_template,
    resolve_method,
)

DEFAULT_MAX_BODY_BYTES = 64 * 1024
MAX_MAX_BODY_BYTES = 4 * 1024 * 1024       # the services' gRPC message limit
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 300.0
DEFAULT_MAX_SUBJECTS = 10_000
MAX_CONFIG_BYTES = 1024 * 1024
BODY_METHODS = ("POST", "PUT", "PATCH")
TOP_KEYS = ("max_body_bytes", "issuers", "rate_limits", "routes")
ROUTE_KEYS = ("name", "http", "grpc", "authority", "compose", "primary", "body", "query",
              "timeout_s", "rate_limit", "auth")

log = logging.getLogger("gateway.config")


class ConfigError(ValueError):
    """The config is refused: ``"<where>: <field>: <reason>"`` (one line)."""


@dataclass(frozen=True)
class GatewayConfig:
    """A validated config. ``issuers`` holds auth.IssuerConfig values (opaque here);
    ``digest``: sha256 of the source text (hex), to tell configs apart."""

    table: RouteTable
    issuers: tuple[Any, ...]
    per_subject: RateLimit | None
    max_subjects: int
    max_body_bytes: int
    digest: str = ""


# ------------------------------------------------------------------------------ parsing
def _mapping(value: Any, field: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{field}: expected a mapping, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in keys)
    if unknown:
        raise ValueError(f"{field}: unknown key(s) {', '.join(unknown)} "
                         f"(known: {', '.join(keys)})")
    return value


def _number(value: Any, field: str, low: float, high: float, *, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        raise ValueError(f"{field}: expected {'an integer' if integer else 'a number'}, "
                         f"got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{field}: must be {low:g} to {high:g}, got {value!r}")
    return float(value)


def parse_rate_limit(value: Any, field: str) -> RateLimit:
    """``{rps: >0, burst: >=1 integer}`` -> RateLimit; raises ValueError "<field>: ..."."""
    doc = _mapping(value, field, ("rps", "burst"))
    if "rps" not in doc or "burst" not in doc:
        raise ValueError(f"{field}: both rps and burst are required")
    rps = _number(doc["rps"], f"{field}.rps", 0.001, 1e6)
    burst = int(_number(doc["burst"], f"{field}.burst", 1, 1e7, integer=True))
    return RateLimit(rps=rps, burst=burst)


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field}: expected a non-empty string, got {value!r}")
    return value.strip()


def parse_route(doc: Any, field: str) -> Route:
    """One route entry -> Route (gRPC methods resolved, variables and query parameters
    checked against the request messages); raises ValueError "<field>.<key>: <reason>"."""
    doc = _mapping(doc, field, ROUTE_KEYS)
    name = _string(doc.get("name"), f"{field}.name")
    http = _string(doc.get("http"), f"{field}.http").split()
    if len(http) != 2 or http[0].upper() not in HTTP_METHODS:
        raise ValueError(f"{field}.http: expected 'METHOD /path' with METHOD one of "
                         f"{', '.join(HTTP_METHODS)}, got {doc.get('http')!r}")
    verb = http[0].upper()
    try:
        template = parse_template(http[1])
    except ValueError as exc:
        raise ValueError(f"{field}.http: {exc}") from None
    if ("grpc" in doc) == ("compose" in doc):
        raise ValueError(f"{field}: exactly one of grpc and compose is required")
    authority = doc.get("authority")
    if authority is not None:
        authority = _string(authority, f"{field}.authority")
    method = None
    parts: tuple[Part, ...] = ()
    primary = ""
    if "grpc" in doc:
        try:
            method = resolve_method(_string(doc["grpc"], f"{field}.grpc"), authority)
        except ValueError as exc:
            raise ValueError(f"{field}.grpc: {exc}") from None
        methods = [("grpc", method)]
        if "primary" in doc:
            raise ValueError(f"{field}.primary: only for a composition")
    else:
        compose = doc["compose"]
        if not isinstance(compose, dict) or not compose:
            raise ValueError(f"{field}.compose: expected a mapping part -> "
                             f"package.Service/Method")
        built = []
        for part_name, target in compose.items():
            pf = f"{field}.compose.{part_name}"
            if not isinstance(part_name, str) or not part_name:
                raise ValueError(f"{pf}: a part needs a name")
            try:
                built.append(Part(part_name, resolve_method(_string(target, pf))))
            except ValueError as exc:
                raise ValueError(f"{pf}: {exc}") from None
        parts = tuple(built)
        methods = [(f"compose.{p.name}", p.method) for p in parts]
        primary = str(doc.get("primary", ""))
        if primary and primary not in compose:
            raise ValueError(f"{field}.primary: {primary!r} is not a part "
                             f"({', '.join(compose)})")
    body = doc.get("body", False)
    if not isinstance(body, bool):
        raise ValueError(f"{field}.body: expected true or false, got {body!r}")
    if body and (verb not in BODY_METHODS or method is None):
        raise ValueError(f"{field}.body: only a transcoded {'/'.join(BODY_METHODS)} route "
                         f"takes a body")
    query = doc.get("query", [])
    if not isinstance(query, list) or not all(isinstance(q, str) and q for q in query):
        raise ValueError(f"{field}.query: expected a list of request field names")
    variables = [s[1:-1] for s in template if s.startswith("{")]
    for where, m in methods:
        fields = m.request_fields
        for v in variables:
            if v not in fields:
                raise ValueError(f"{field}.http: {{{v}}} is not a field of "
                                 f"{m.request_cls.DESCRIPTOR.full_name} ({where})")
        for q in query:
            if q not in fields:
                raise ValueError(f"{field}.query: {q!r} is not a field of "
                                 f"{m.request_cls.DESCRIPTOR.full_name} ({where})")
    timeout_s = _number(doc.get("timeout_s", DEFAULT_TIMEOUT_S), f"{field}.timeout_s",
                        0.01, MAX_TIMEOUT_S)
    rate_limit = (parse_rate_limit(doc["rate_limit"], f"{field}.rate_limit")
                  if doc.get("rate_limit") is not None else None)
    auth = doc.get("auth", True)
    if not isinstance(auth, bool):
        raise ValueError(f"{field}.auth: expected true or false, got {auth!r}")
    return Route(name=name, http_method=verb, template=template, method=method, parts=parts,
                 primary=primary, body=body, query=tuple(query), timeout_s=timeout_s,
                 rate_limit=rate_limit, auth=auth)


def _parse_issuers(doc: Any, field: str) -> tuple[Any, ...]:
    from .auth import parse_issuers  # the auth helper's parser
    return tuple(parse_issuers(doc, field))


def parse_document(doc: Any, where: str = "config",
                   issuers_parser: Callable[[Any, str], tuple[Any, ...]] | None = None,
                   digest: str = "") -> GatewayConfig:
    """A loaded YAML document -> GatewayConfig, validated whole; raises ConfigError
    ``"<where>: <field>: <reason>"`` for the first problem. ``issuers_parser`` defaults to
    ``auth.parse_issuers`` (tests may pass another)."""
    try:
        if doc is None:
            raise ValueError("empty document")
        doc = _mapping(doc, "(top)", TOP_KEYS)
        max_body = int(_number(doc.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES),
                               "max_body_bytes", 1, MAX_MAX_BODY_BYTES, integer=True))
        rl = _mapping(doc.get("rate_limits") or {}, "rate_limits",
                      ("per_subject", "max_subjects"))
        per_subject = (parse_rate_limit(rl["per_subject"], "rate_limits.per_subject")
                       if rl.get("per_subject") is not None else None)
        max_subjects = int(_number(rl.get("max_subjects", DEFAULT_MAX_SUBJECTS),
                                   "rate_limits.max_subjects", 1, 1e7, integer=True))
        raw_routes = doc.get("routes")
        if not isinstance(raw_routes, list) or not raw_routes:
            raise ValueError("routes: expected a non-empty list")
        routes = [parse_route(r, f"routes[{i}]") for i, r in enumerate(raw_routes)]
        names: set[str] = set()
        shapes: dict[tuple[str, tuple[str, ...]], str] = {}
        for i, r in enumerate(routes):
            if r.name in names:
                raise ValueError(f"routes[{i}].name: {r.name!r} is used twice")
            names.add(r.name)
            shape = (r.http_method, tuple("{}" if s.startswith("{") else s
                                          for s in r.template))
            if shape in shapes:
                raise ValueError(f"routes[{i}].http: {r.http_method} {r.pattern} overlaps "
                                 f"route {shapes[shape]!r}")
            shapes[shape] = r.name
        issuers_doc = doc.get("issuers")
        needs_auth = any(r.auth for r in routes)
        if needs_auth and not issuers_doc:
            raise ValueError("issuers: required while a route has auth: true")
        issuers = ((issuers_parser or _parse_issuers)(issuers_doc, "issuers")
                   if issuers_doc else ())
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return GatewayConfig(table=RouteTable(tuple(routes)), issuers=tuple(issuers),
                         per_subject=per_subject, max_subjects=max_subjects,
                         max_body_bytes=max_body, digest=digest)


def parse_config(text: str, where: str = "config",
                 issuers_parser: Callable[[Any, str], tuple[Any, ...]] | None = None
                 ) -> GatewayConfig:
    """YAML text -> GatewayConfig (see ``parse_document``); a YAML syntax error is a
    ConfigError too."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()
        raise ConfigError(f"{where}: not valid YAML: {' '.join(first[:2])}") from None
    return parse_document(doc, where, issuers_parser, digest)


def load_config(path: Path,
                issuers_parser: Callable[[Any, str], tuple[Any, ...]] | None = None
                ) -> GatewayConfig:
    """Read and parse ``path``; raises ConfigError (also when it cannot be read or is over
    1 MiB)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {len(data)} bytes, at most {MAX_CONFIG_BYTES}")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(text, str(path), issuers_parser)


# ------------------------------------------------------------------------------ watching
def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def log_event(event: str, **fields: Any) -> None:
    """One JSON line on stdout (the gateway's log): ``{"config": event, ...}``."""
    sys.stdout.write(json.dumps({"config": event, "ts": round(time.time(), 3), **fields})
                     + "\n")
    sys.stdout.flush()


class ConfigWatcher:
    """Keeps ``current`` (the last good config of ``path``) and polls the file every
    ``interval_s`` seconds; on a change (mtime, size or inode) it loads the file and calls
    ``on_change(new)``, then makes it current; when loading fails or ``on_change`` raises
    ConfigError it logs the refusal and keeps the old one.
    ``status()`` tells which is in force and the last refusal."""

    def __init__(self, path: Path, current: GatewayConfig,
                 on_change: Callable[[GatewayConfig], Awaitable[None]],
                 interval_s: float = 1.0,
                 loader: Callable[[Path], GatewayConfig] = load_config) -> None:
        self.path = path
        self.current = current
        self.on_change = on_change
        self.interval_s = interval_s
        self.loader = loader
        self.generation = 1
        self.loaded_at = time.time()
        self.last_error = ""
        self.last_error_at = 0.0
        self._stamp = _stamp(path)
        self._task: asyncio.Task[None] | None = None

    def status(self) -> Mapping[str, Any]:
        return {"path": str(self.path), "generation": self.generation,
                "sha256": self.current.digest, "loaded_at_unix": round(self.loaded_at, 3),
                "routes": [r.name for r in self.current.table.routes],
                "last_error": self.last_error,
                "last_error_at_unix": round(self.last_error_at, 3)}

    async def check(self) -> bool:
        """Look at the file once; True if a new config was put in force."""
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            new = self.loader(self.path)
        except ConfigError as exc:
            self.last_error, self.last_error_at = str(exc), time.time()
            log_event("refused", reason=str(exc), kept_sha256=self.current.digest,
                      generation=self.generation)
            return False
        if new.digest == self.current.digest:
            return False
        try:
            await self.on_change(new)   # may refuse it too (e.g. an unreadable key file)
        except ConfigError as exc:
            self.last_error, self.last_error_at = str(exc), time.time()
            log_event("refused", reason=str(exc), kept_sha256=self.current.digest,
                      generation=self.generation)
            return False
        self.current = new
        self.generation += 1
        self.loaded_at = time.time()
        self.last_error = ""
        log_event("loaded", path=str(self.path), sha256=new.digest,
                  generation=self.generation, routes=len(new.table.routes))
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # never let the watcher die: log and keep polling
                log.exception("config watcher")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
