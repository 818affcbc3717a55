"""Consul stand-in: a TEST DOUBLE serving the subset of Consul's HTTP API the mesh uses.

    python -m tests.support.consul_standin --listen 127.0.0.1:0 [--acl-token T] [--data FILE]
        [--node-name NAME] [--datacenter DC]

No Consul server can be installed where the mesh's tests run, so the Consul registry backend
(issue 15) is tested against this process. It is not Consul: one asyncio process, one node,
state in memory (optionally persisted to `--data FILE` as JSON after every change, so a
restarted stand-in keeps its catalog, KV and sessions), and one raft-like index that grows
by one on every write. It prints one stdout line `{"ready": "HOST:PORT"}` once it serves and
stops on SIGTERM/SIGINT with exit code 0. The same contract tests run against a real Consul
(`consul agent -dev`) when `CONSUL_HTTP_ADDR` is set; where this double and Consul differ,
Consul is right and this file is the bug.

Behaviour follows Consul's API documentation (developer.hashicorp.com/consul/api-docs/...):
`agent` (self), `agent/service`, `agent/check`, `catalog`, `health`, `kv`, `txn`,
`session`, `status`, `features/blocking`, `features/consistency`, and the sessions
overview (`docs/automate/session`) for lock-delay and invalidation.

Implemented:

* Agent: PUT /v1/agent/service/register (ID, Name, Address, Port, Tags, Meta, Weights,
  EnableTagOverride, Check or Checks; `?replace-existing-checks`), PUT
  /v1/agent/service/deregister/{id}, PUT /v1/agent/check/register and
  /v1/agent/check/deregister/{id} (TTL checks), PUT /v1/agent/check/pass|warn|fail/{id}
  (`?note=`), PUT /v1/agent/check/update/{id} (`{"Status", "Output"}`), GET
  /v1/agent/services, /v1/agent/service/{id}, /v1/agent/checks, /v1/agent/self. Field names
  in request bodies match as Consul's decoder does (case-insensitive, snake_case accepted).
  Check IDs as Consul makes them: `service:{id}` for a service's single check,
  `service:{id}:{n}` (n from 1) when it has several; default name `Service '{name}' check`;
  initial status `critical` unless `Status` says otherwise; re-registering a service keeps
  the status and output of its checks that still exist (as Consul's agent does).
* TTL checks only (HTTP/TCP/gRPC/script/docker/alias checks are refused with 400: the double
  runs no probes). A TTL check not updated within its TTL turns critical with output
  `TTL expired`. A service whose check has been critical for longer than its
  DeregisterCriticalServiceAfter is deregistered. Both are exact here (timer tick 50 ms);
  Consul's reaper runs every 30 s and enforces a 1 minute minimum, so production code must
  not depend on the deregistration happening sooner than that.
* Catalog/health: GET /v1/catalog/services, /v1/catalog/service/{name}, /v1/catalog/nodes,
  /v1/catalog/datacenters, /v1/health/service/{name} (`?passing`, `?tag`),
  /v1/health/checks/{service}; Consul's JSON shapes. The node's `serfHealth` check and the
  `consul` service (port 8300) exist as on a one-server agent. A node-level check (a check
  registered without ServiceID) counts for every service on the node, as in Consul.
* Blocking queries on every endpoint Consul documents as blocking (catalog, health, kv,
  session info/list/node): `?index=N&wait=D` (Go duration; default 5m, capped at 10m; no
  jitter) answers when the relevant index differs from N (greater: a change; lower: the
  state went backwards, e.g. a restart without --data, and the client must reset, as the
  blocking-queries page says) or when the wait is over. Relevant index: catalog/services:
  the services table; catalog/service, health/service, health/checks: that service's index
  (bumped by its instances and their checks' status), falling back to the services table
  for a service never seen; kv: the highest ModifyIndex (or deletion) under the key or
  prefix, falling back to the KV table; sessions: the sessions table. X-Consul-Index (never
  below 1), X-Consul-KnownLeader: true, X-Consul-LastContact: 0 and
  X-Consul-Effective-Consistency on those reads. Agent and status endpoints neither block
  nor send X-Consul-Index, as in Consul (`?index` is ignored there).
* Consistency modes: `?stale` and `?consistent` accepted (one node: the same answer); both
  at once is a 400. `?dc` other than ours is a 500 "No path to datacenter".
* KV: GET /v1/kv/{key} (`?recurse`, `?keys`, `?separator`, `?raw`; 404 when nothing
  matches; values base64 in JSON; LockIndex, Session, Flags, CreateIndex, ModifyIndex), PUT
  (raw body; `?flags`, `?cas` (0 = only if absent), `?acquire=SESSION`, `?release=SESSION`;
  answers `true`/`false`), DELETE (`?recurse`, `?cas`). Values over 512 KiB get 413.
  PUT /v1/txn with KV operations (set, cas, lock, unlock, get, get-tree, check-index,
  check-session, check-not-exists, delete, delete-tree, delete-cas), atomic, at most 64.
* Sessions: PUT /v1/session/create (Name, Node, TTL "10s".."86400s" or none, LockDelay
  default 15s, capped at 60s; a number below 1000 is seconds, else nanoseconds, as Consul;
  Behavior release|delete, Checks/NodeChecks/ServiceChecks, default `serfHealth`), PUT
  /v1/session/destroy/{id}, PUT /v1/session/renew/{id} (404 when gone), GET
  /v1/session/info/{id}, /v1/session/list, /v1/session/node/{node}. A session is
  invalidated when destroyed, when its TTL passes without a renew (exactly TTL here; Consul
  may wait up to 2x TTL), or when one of its checks turns critical or is deregistered: its
  locks are released (Behavior=release) or its keys deleted (Behavior=delete), and
  acquiring any of those keys fails for LockDelay. A `?release` is voluntary: no lock-delay.
* GET /v1/status/leader ("127.0.0.1:8300"), /v1/status/peers.
* ACL: started with `--acl-token T`, every request but /v1/status/* and /_standin/* must
  carry T (`?token=`, `X-Consul-Token`, or `Authorization: Bearer`): a missing token gets
  403 "Permission denied: anonymous token lacks permission", another token 403 "ACL not
  found" (Consul's texts). One token that may do everything: no policies, no roles, and no
  silent filtering of list results (Consul filters lists for a token lacking read rights).
* Errors are text bodies with Consul's status codes: 400 (bad JSON, bad parameters), 403,
  404, 405 (wrong method), 409 (failed txn, JSON as in Consul), 413, 500 (what Consul
  answers with 500, e.g. an unknown session on acquire).
* Not Consul: GET /_standin/stats answers `{"index", "blocked": [{"path", "index"}],
  "services", "checks", "kv", "sessions"}` so tests can see a blocking query parked before
  they make the change that should wake it.

Omitted (a request that needs them gets a 400 naming the gap, never a silent wrong answer):
raft and several servers (one node, always the leader), other nodes and catalog/register,
`?filter`, `?node-meta`, `?peer`, hash-based blocking on agent endpoints, agent caching
(`?cached` is ignored), Connect/proxies/gateways, non-TTL checks, ACL policies and the
/v1/acl API, prepared queries, events, DNS, gossip, the UI, namespaces and partitions.
Check output that changes without a status change is stored but bumps no index (Consul
defers those syncs by check_update_interval). Lock-delays are not persisted; after a restart
with --data every TTL (checks and sessions) starts over, as after a Consul leader election.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import copy
import json
import logging
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from mesh_common.cli_args import OneLineArgumentParser

log = logging.getLogger("consul_standin")

DATACENTER = "dc1"
NODE_ADDRESS = "127.0.0.1"
LEADER_ADDRESS = "127.0.0.1:8300"
CONSUL_VERSION = "1.20.0"  # the API generation this double follows; Revision says "standin"
KV_MAX_VALUE_BYTES = 512 * 1024
TXN_MAX_OPS = 64
CHECK_OUTPUT_MAX_BYTES = 4096
DEFAULT_WAIT_S = 300.0
MAX_WAIT_S = 600.0
SESSION_TTL_MIN_S = 10.0
SESSION_TTL_MAX_S = 86400.0
DEFAULT_LOCK_DELAY_S = 15.0
MAX_LOCK_DELAY_S = 60.0
TIMER_TICK_S = 0.05
REQUEST_MAX_BYTES = 4 * 1024 * 1024
SERF_CHECK_ID = "serfHealth"
HEALTH_STATUSES = ("passing", "warning", "critical")
UNSUPPORTED_QUERY_PARAMS = ("filter", "node-meta", "peer", "merge-central-config")
UNSUPPORTED_CHECK_KINDS = (
    "HTTP", "TCP", "UDP", "GRPC", "H2PING", "OSService", "Args", "ScriptArgs", "Script",
    "DockerContainerID", "AliasNode", "AliasService",
)
_META_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_DURATION_PART_RE = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

Json = Any


class ConsulError(Exception):
    """An HTTP error answer: `status` and a plain-text `text` body, as Consul sends them."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status} {text}")
        self.status = status
        self.text = text


# -- small parsers ------------------------------------------------------------------------


def parse_go_duration_s(text: str) -> float:
    """Seconds in a Go duration string ("10s", "1m30s", "250ms", "0"); raises ValueError."""
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART_RE.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _DURATION_UNIT_S[m.group(2)]
        pos = m.end()
    return sign * total


def format_go_duration(seconds: float) -> str:
    """A Go-style duration string for `seconds` (1.0 -> "1s", 90 -> "1m30s", 0.25 -> "250ms")."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    neg = ns < 0
    ns = abs(ns)
    if ns < 1_000_000_000:
        if ns % 1_000_000 == 0:
            out = f"{ns // 1_000_000}ms"
        elif ns % 1000 == 0:
            out = f"{ns // 1000}µs"
        else:
            out = f"{ns}ns"
    else:
        hours, rem = divmod(ns, 3600 * 1_000_000_000)
        minutes, rem = divmod(rem, 60 * 1_000_000_000)
        secs = f"{rem / 1e9:.9f}".rstrip("0").rstrip(".")
        out = (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + f"{secs}s"
    return ("-" if neg else "") + out


def _duration_field_s(value: Any, what: str, *, small_numbers_are_seconds: bool = False) -> float:
    """A duration from a JSON body: a Go duration string, or a number of nanoseconds (below 1000
    read as seconds when `small_numbers_are_seconds`, Consul's rule for LockDelay). 400 if bad."""
    if isinstance(value, bool):
        raise ConsulError(400, f"Request decode failed: invalid duration for {what}: {value!r}")
    if isinstance(value, (int, float)):
        if small_numbers_are_seconds and value < 1000:
            return float(value)
        return float(value) / 1e9
    if isinstance(value, str):
        try:
            return parse_go_duration_s(value)
        except ValueError:
            raise ConsulError(400, f"Request decode failed: time: invalid duration {value!r} for {what}")
    raise ConsulError(400, f"Request decode failed: invalid duration for {what}: {value!r}")


def _field(obj: Mapping[str, Any], *names: str) -> Any:
    """The value of the first of `names` in `obj`, matched as Consul's decoder matches struct
    fields (case-insensitive, snake_case accepted); None when absent."""
    wanted = {n.lower().replace("_", "") for n in names}
    for k, v in obj.items():
        if isinstance(k, str) and k.lower().replace("_", "") in wanted:
            return v
    return None


def _str_field(obj: Mapping[str, Any], *names: str, default: str = "") -> str:
    v = _field(obj, *names)
    if v is None:
        return default
    if not isinstance(v, str):
        raise ConsulError(400, f"Request decode failed: {names[0]} must be a string, got {v!r}")
    return v


def _decode_json_body(raw: bytes, *, allow_empty: bool = False) -> Json:
    if not raw.strip():
        if allow_empty:
            return None
        raise ConsulError(400, "Request decode failed: EOF")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConsulError(400, f"Request decode failed: {e}")


def _query_flag(query: Mapping[str, str], name: str) -> bool:
    """Consul's presence flags (`?recurse`, `?keys`, `?raw`, `?passing`): present means true
    unless the value says false."""
    if name not in query:
        return False
    return query[name].strip().lower() not in ("false", "0")


def _query_uint(query: Mapping[str, str], name: str, what: str) -> int | None:
    if name not in query:
        return None
    text = query[name]
    try:
        value = int(text)
    except ValueError:
        raise ConsulError(400, f"Invalid {what}: {text!r}")
    if value < 0 or value >= 2**64:
        raise ConsulError(400, f"Invalid {what}: {text!r}")
    return value


def _truncate_output(text: str) -> str:
    data = text.encode()
    if len(data) <= CHECK_OUTPUT_MAX_BYTES:
        return text
    return data[:CHECK_OUTPUT_MAX_BYTES].decode(errors="ignore") + f" ... (captured 4096 of {len(data)} bytes)"


# -- state --------------------------------------------------------------------------------


@dataclass
class Service:
    """An instance registered through the agent (one node, so agent and catalog agree)."""

    id: str
    name: str
    tags: list[str]
    meta: dict[str, str]
    address: str
    port: int
    weights: dict[str, int]
    enable_tag_override: bool
    create_index: int
    modify_index: int


@dataclass
class Check:
    """A TTL health check; `service_id` empty for a node-level check."""

    check_id: str
    name: str
    service_id: str
    service_name: str
    status: str
    notes: str
    output: str
    ttl_s: float | None
    deregister_after_s: float | None
    create_index: int
    modify_index: int
    ttl_deadline: float | None = field(default=None, compare=False)  # monotonic s, not persisted
    critical_since: float | None = field(default=None, compare=False)  # monotonic s, not persisted


@dataclass
class KVEntry:
    key: str
    value: bytes | None
    flags: int
    session: str | None
    lock_index: int
    create_index: int
    modify_index: int


@dataclass
class KVState:
    """The KV table and its tombstones (key -> index of its deletion): copied whole by a txn."""

    entries: dict[str, KVEntry] = field(default_factory=dict)
    tombstones: dict[str, int] = field(default_factory=dict)


@dataclass
class Session:
    id: str
    name: str
    node: str
    lock_delay_s: float
    behavior: str
    ttl: str  # as given ("" for none)
    ttl_s: float | None
    node_checks: list[str]
    service_checks: list[dict[str, str]]
    create_index: int
    modify_index: int
    expires_at: float | None = field(default=None, compare=False)  # monotonic s, not persisted


class Store:
    """The stand-in's state and every rule that changes it. No I/O and no clock of its own:
    `clock()` gives monotonic seconds, and `tick()` must be called periodically to run TTLs,
    reaping and session expiry. `on_change()` is called after every write that bumps the
    index; `dirty` is set by any change worth persisting."""

    def __init__(
        self,
        *,
        node_name: str,
        datacenter: str = DATACENTER,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.node_name = node_name
        self.node_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node_name}.consul-standin"))
        self.datacenter = datacenter
        self.clock = clock
        self.on_change = on_change
        self.index = 0
        self.table_index: dict[str, int] = {"nodes": 0, "services": 0, "checks": 0, "kvs": 0, "sessions": 0}
        self.service_index: dict[str, int] = {}
        self.services: dict[str, Service] = {}
        self.checks: dict[str, Check] = {}
        self.kv = KVState()
        self.sessions: dict[str, Session] = {}
        self.lock_delays: dict[str, float] = {}  # key -> monotonic s until which acquire fails
        self.dirty = False
        idx = self._next()
        self.node_index = idx
        self._touch(idx, "nodes", "services", "checks", services=("consul",))

    # -- index bookkeeping ----------------------------------------------------------------
    def _next(self) -> int:
        return self.index + 1

    def _touch(self, idx: int, *tables: str, services: Iterable[str] = ()) -> None:
        """Record a write at `idx` to `tables` (and to the named services' index)."""
        self.index = max(self.index, idx)
        for t in tables:
            self.table_index[t] = idx
        for s in services:
            self.service_index[s] = idx
        self.dirty = True
        self.on_change()

    # -- node -----------------------------------------------------------------------------
    def _node_json(self) -> dict[str, Json]:
        return {
            "ID": self.node_id,
            "Node": self.node_name,
            "Address": NODE_ADDRESS,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {
                "lan": NODE_ADDRESS, "lan_ipv4": NODE_ADDRESS, "wan": NODE_ADDRESS, "wan_ipv4": NODE_ADDRESS,
            },
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": self.node_index,
            "ModifyIndex": self.node_index,
        }

    def _serf_check_json(self) -> dict[str, Json]:
        return {
            "Node": self.node_name,
            "CheckID": SERF_CHECK_ID,
            "Name": "Serf Health Status",
            "Status": "passing",
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": self.node_index,
            "ModifyIndex": self.node_index,
        }

    def agent_self(self) -> dict[str, Json]:
        return {
            "Config": {
                "Datacenter": self.datacenter,
                "NodeName": self.node_name,
                "NodeID": self.node_id,
                "Server": True,
                "Revision": "standin",
                "Version": CONSUL_VERSION,
            },
            "Member": {"Name": self.node_name, "Addr": NODE_ADDRESS, "Port": 8301, "Status": 1, "Tags": {"dc": self.datacenter}},
            "Meta": {"consul-network-segment": ""},
        }

    # -- services and checks --------------------------------------------------------------
    def _parse_check(self, raw: Any, *, default_id: str, default_name: str) -> dict[str, Any]:
        """A check definition from a request body (TTL checks only), as a dict of plain values."""
        if not isinstance(raw, Mapping):
            raise ConsulError(400, f"Request decode failed: check must be an object, got {raw!r}")
        for kind in UNSUPPORTED_CHECK_KINDS:
            if _field(raw, kind):
                raise ConsulError(
                    400, f"consul stand-in: only TTL checks are implemented (this check sets {kind})"
                )
        ttl_raw = _field(raw, "TTL")
        if ttl_raw is None or ttl_raw == "":
            raise ConsulError(400, "Check type is not valid")
        ttl_s = _duration_field_s(ttl_raw, "TTL")
        if ttl_s <= 0:
            raise ConsulError(400, "TTL must be > 0 for TTL checks")
        status = _str_field(raw, "Status") or "critical"
        if status not in HEALTH_STATUSES:
            raise ConsulError(400, "Status for checks must 'passing', 'warning', 'critical'")
        dereg_raw = _field(raw, "DeregisterCriticalServiceAfter")
        dereg_s = None
        if dereg_raw not in (None, ""):
            dereg_s = _duration_field_s(dereg_raw, "DeregisterCriticalServiceAfter")
            if dereg_s <= 0:
                dereg_s = None
        return {
            "check_id": _str_field(raw, "CheckID", "ID") or default_id,
            "name": _str_field(raw, "Name") or default_name,
            "status": status,
            "notes": _str_field(raw, "Notes"),
            "output": _str_field(raw, "Output"),
            "ttl_s": ttl_s,
            "deregister_after_s": dereg_s,
        }

    def register_service(self, body: Any, *, replace_existing_checks: bool) -> None:
        """PUT /v1/agent/service/register. Raises ConsulError(400) for a bad definition."""
        if not isinstance(body, Mapping):
            raise ConsulError(400, "Request decode failed: body must be a JSON object")
        for unsupported in ("Kind", "Proxy", "Connect"):
            if _field(body, unsupported):
                raise ConsulError(400, f"consul stand-in: {unsupported} (Connect, proxies, gateways) is not implemented")
        name = _str_field(body, "Name", "Service")
        if not name:
            raise ConsulError(400, "Missing service name")
        sid = _str_field(body, "ID") or name
        tags = _field(body, "Tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ConsulError(400, "Request decode failed: Tags must be a list of strings")
        meta = _field(body, "Meta") or {}
        if not isinstance(meta, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ConsulError(400, "Request decode failed: Meta must map strings to strings")
        _validate_meta(meta)
        port = _field(body, "Port") or 0
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConsulError(400, f"Request decode failed: invalid Port {port!r}")
        weights_raw = _field(body, "Weights")
        weights = {"Passing": 1, "Warning": 1}
        if isinstance(weights_raw, Mapping):
            passing = _field(weights_raw, "Passing")
            warning = _field(weights_raw, "Warning")
            if isinstance(passing, int) and passing > 0:
                weights["Passing"] = passing
            if isinstance(warning, int) and warning >= 0:
                weights["Warning"] = warning
        raw_checks: list[Any] = []
        single = _field(body, "Check")
        if single:
            raw_checks.append(single)
        many = _field(body, "Checks")
        if many:
            if not isinstance(many, list):
                raise ConsulError(400, "Request decode failed: Checks must be a list")
            raw_checks.extend(many)
        defs = []
        for i, raw in enumerate(raw_checks):
            default_id = f"service:{sid}" if len(raw_checks) == 1 else f"service:{sid}:{i + 1}"
            defs.append(self._parse_check(raw, default_id=default_id, default_name=f"Service '{name}' check"))

        idx = self._next()
        now = self.clock()
        old = self.services.get(sid)
        touched_services = {name}
        if old is not None:
            touched_services.add(old.name)
        self.services[sid] = Service(
            id=sid,
            name=name,
            tags=list(tags),
            meta=dict(meta),
            address=_str_field(body, "Address"),
            port=port,
            weights=weights,
            enable_tag_override=bool(_field(body, "EnableTagOverride")),
            create_index=old.create_index if old else idx,
            modify_index=idx,
        )
        new_ids = {d["check_id"] for d in defs}
        for cid in [c.check_id for c in self.checks.values() if c.service_id == sid]:
            if cid in new_ids:
                continue
            if replace_existing_checks:
                self._remove_check(cid, idx)
            else:  # kept, but follows the service's new name
                self.checks[cid].service_name = name
        for d in defs:
            prev = self.checks.get(d["check_id"])
            check = Check(
                service_id=sid,
                service_name=name,
                create_index=prev.create_index if prev else idx,
                modify_index=idx,
                **d,
            )
            if prev is not None:  # Consul keeps a re-registered check's state
                check.status = prev.status
                check.output = prev.output
                check.critical_since = prev.critical_since
            check.ttl_deadline = now + check.ttl_s if check.ttl_s else None
            if check.status == "critical" and check.critical_since is None:
                check.critical_since = now
            self.checks[check.check_id] = check
        self._touch(idx, "services", "checks", services=touched_services)
        for d in defs:
            if self.checks[d["check_id"]].status == "critical":
                self._invalidate_sessions_of_check(d["check_id"], idx)

    def deregister_service(self, service_id: str) -> None:
        """PUT /v1/agent/service/deregister/{id}: the service and its checks. 404 if unknown."""
        if service_id not in self.services:
            raise ConsulError(
                404, f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.'
            )
        self._deregister_service(service_id, self._next())

    def _deregister_service(self, service_id: str, idx: int) -> None:
        svc = self.services.pop(service_id)
        for cid in [c.check_id for c in self.checks.values() if c.service_id == service_id]:
            self._remove_check(cid, idx)
        self._touch(idx, "services", "checks", services=(svc.name,))

    def register_check(self, body: Any) -> None:
        """PUT /v1/agent/check/register (TTL checks; node-level when ServiceID is empty)."""
        if not isinstance(body, Mapping):
            raise ConsulError(400, "Request decode failed: body must be a JSON object")
        name = _str_field(body, "Name")
        if not name:
            raise ConsulError(400, "Missing check name")
        d = self._parse_check(body, default_id=name, default_name=name)
        service_id = _str_field(body, "ServiceID")
        service_name = ""
        if service_id:
            svc = self.services.get(service_id)
            if svc is None:
                raise ConsulError(400, f'ServiceID "{service_id}" does not exist')
            service_name = svc.name
        idx = self._next()
        now = self.clock()
        prev = self.checks.get(d["check_id"])
        check = Check(
            service_id=service_id,
            service_name=service_name,
            create_index=prev.create_index if prev else idx,
            modify_index=idx,
            **d,
        )
        check.ttl_deadline = now + check.ttl_s if check.ttl_s else None
        check.critical_since = now if check.status == "critical" else None
        self.checks[check.check_id] = check
        affected = self._services_affected_by(check)
        if prev is not None:
            affected |= self._services_affected_by(prev)
        self._touch(idx, "checks", services=affected)
        if check.status == "critical":
            self._invalidate_sessions_of_check(check.check_id, idx)

    def deregister_check(self, check_id: str) -> None:
        if check_id not in self.checks:
            raise ConsulError(404, f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.')
        idx = self._next()
        affected = self._services_affected_by(self.checks[check_id])
        self._remove_check(check_id, idx)
        self._touch(idx, "checks", services=affected)

    def _services_affected_by(self, check: Check) -> set[str]:
        if check.service_id:
            return {check.service_name}
        return {s.name for s in self.services.values()} | {"consul"}

    def _remove_check(self, check_id: str, idx: int) -> None:
        self.checks.pop(check_id, None)
        self._invalidate_sessions_of_check(check_id, idx)

    def update_ttl(self, check_id: str, status: str, output: str) -> None:
        """A TTL check's pass/warn/fail/update: resets its TTL and sets its status. 404 if unknown."""
        check = self.checks.get(check_id)
        if check is None:
            raise ConsulError(404, f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.')
        if status not in HEALTH_STATUSES:
            raise ConsulError(400, f"Invalid check status: '{status}'")
        now = self.clock()
        if check.ttl_s:
            check.ttl_deadline = now + check.ttl_s
        self._set_status(check, status, output, now)

    def _set_status(self, check: Check, status: str, output: str, now: float) -> None:
        output = _truncate_output(output)
        if status == check.status:
            if output != check.output:
                check.output = output
                self.dirty = True  # output-only: stored, no index (Consul defers such syncs)
            return
        idx = self._next()
        check.status = status
        check.output = output
        check.modify_index = idx
        check.critical_since = now if status == "critical" else None
        self._touch(idx, "checks", services=self._services_affected_by(check))
        if status == "critical":
            self._invalidate_sessions_of_check(check.check_id, idx)

    def _check_json(self, c: Check) -> dict[str, Json]:
        svc = self.services.get(c.service_id)
        definition: dict[str, Json] = {}
        if c.ttl_s:
            definition["TTL"] = format_go_duration(c.ttl_s)
        if c.deregister_after_s:
            definition["DeregisterCriticalServiceAfter"] = format_go_duration(c.deregister_after_s)
        return {
            "Node": self.node_name,
            "CheckID": c.check_id,
            "Name": c.name,
            "Status": c.status,
            "Notes": c.notes,
            "Output": c.output,
            "ServiceID": c.service_id,
            "ServiceName": c.service_name,
            "ServiceTags": list(svc.tags) if svc else [],
            "Type": "ttl",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": definition,
            "CreateIndex": c.create_index,
            "ModifyIndex": c.modify_index,
        }

    def _agent_service_json(self, s: Service) -> dict[str, Json]:
        return {
            "ID": s.id,
            "Service": s.name,
            "Tags": list(s.tags),
            "Meta": dict(s.meta),
            "Port": s.port,
            "Address": s.address,
            "Weights": dict(s.weights),
            "EnableTagOverride": s.enable_tag_override,
            "Datacenter": self.datacenter,
        }

    def agent_services(self) -> dict[str, Json]:
        return {sid: self._agent_service_json(s) for sid, s in sorted(self.services.items())}

    def agent_service(self, service_id: str) -> dict[str, Json]:
        s = self.services.get(service_id)
        if s is None:
            raise ConsulError(404, f"unknown service ID: {service_id}")
        return self._agent_service_json(s)

    def agent_checks(self) -> dict[str, Json]:
        return {cid: self._check_json(c) for cid, c in sorted(self.checks.items())}

    # -- catalog and health (each returns (relevant index, body)) ---------------------------
    def _consul_service(self) -> Service:
        return Service(
            id="consul", name="consul", tags=[], meta={"raft_version": "3", "version": CONSUL_VERSION},
            address="", port=8300, weights={"Passing": 1, "Warning": 1}, enable_tag_override=False,
            create_index=self.node_index, modify_index=self.node_index,
        )

    def _instances(self, name: str, tags: list[str]) -> list[Service]:
        if name == "consul":
            found = [self._consul_service()]
        else:
            found = [s for s in self.services.values() if s.name == name]
        return sorted((s for s in found if all(t in s.tags for t in tags)), key=lambda s: s.id)

    def _service_rel_index(self, name: str) -> int:
        return self.service_index.get(name) or self.table_index["services"]

    def catalog_services(self) -> tuple[int, dict[str, list[str]]]:
        out: dict[str, list[str]] = {"consul": []}
        for s in self.services.values():
            tags = out.setdefault(s.name, [])
            for t in s.tags:
                if t not in tags:
                    tags.append(t)
        return self.table_index["services"], dict(sorted(out.items()))

    def catalog_service(self, name: str, tags: list[str]) -> tuple[int, list[dict[str, Json]]]:
        node = self._node_json()
        out = []
        for s in self._instances(name, tags):
            out.append({
                "ID": node["ID"],
                "Node": node["Node"],
                "Address": node["Address"],
                "Datacenter": node["Datacenter"],
                "TaggedAddresses": node["TaggedAddresses"],
                "NodeMeta": node["Meta"],
                "ServiceKind": "",
                "ServiceID": s.id,
                "ServiceName": s.name,
                "ServiceTags": list(s.tags),
                "ServiceAddress": s.address,
                "ServiceWeights": dict(s.weights),
                "ServiceMeta": dict(s.meta),
                "ServicePort": s.port,
                "ServiceEnableTagOverride": s.enable_tag_override,
                "ServiceProxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
                "ServiceConnect": {},
                "CreateIndex": s.create_index,
                "ModifyIndex": s.modify_index,
            })
        return self._service_rel_index(name), out

    def _checks_for_instance(self, s: Service) -> list[dict[str, Json]]:
        node_checks = [self._serf_check_json()] + [
            self._check_json(c) for c in sorted(self.checks.values(), key=lambda c: c.check_id) if not c.service_id
        ]
        svc_checks = [
            self._check_json(c) for c in sorted(self.checks.values(), key=lambda c: c.check_id) if c.service_id == s.id
        ]
        return node_checks + svc_checks

    def health_service(self, name: str, tags: list[str], passing: bool) -> tuple[int, list[dict[str, Json]]]:
        node = self._node_json()
        out = []
        for s in self._instances(name, tags):
            checks = self._checks_for_instance(s)
            if passing and any(c["Status"] != "passing" for c in checks):
                continue
            out.append({
                "Node": node,
                "Service": {
                    "ID": s.id,
                    "Service": s.name,
                    "Tags": list(s.tags),
                    "Address": s.address,
                    "Meta": dict(s.meta),
                    "Port": s.port,
                    "Weights": dict(s.weights),
                    "EnableTagOverride": s.enable_tag_override,
                    "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
                    "Connect": {},
                    "CreateIndex": s.create_index,
                    "ModifyIndex": s.modify_index,
                },
                "Checks": checks,
            })
        return self._service_rel_index(name), out

    def health_checks(self, name: str) -> tuple[int, list[dict[str, Json]]]:
        out = [
            self._check_json(c)
            for c in sorted(self.checks.values(), key=lambda c: c.check_id)
            if c.service_id and c.service_name == name
        ]
        return self._service_rel_index(name), out

    def catalog_nodes(self) -> tuple[int, list[dict[str, Json]]]:
        return self.table_index["nodes"], [self._node_json()]

    # -- KV -------------------------------------------------------------------------------
    @staticmethod
    def _kv_json(e: KVEntry, *, with_value: bool = True) -> dict[str, Json]:
        value = None
        if with_value and e.value:
            value = base64.b64encode(e.value).decode()
        out: dict[str, Json] = {
            "LockIndex": e.lock_index,
            "Key": e.key,
            "Flags": e.flags,
            "Value": value,
            "CreateIndex": e.create_index,
            "ModifyIndex": e.modify_index,
        }
        if e.session:
            out["Session"] = e.session
        return out

    def _kv_rel_index(self, key: str, prefix: bool) -> int:
        best = 0
        for k, e in self.kv.entries.items():
            if (k.startswith(key) if prefix else k == key) and e.modify_index > best:
                best = e.modify_index
        for k, i in self.kv.tombstones.items():
            if (k.startswith(key) if prefix else k == key) and i > best:
                best = i
        return best or self.table_index["kvs"]

    def kv_get(self, key: str, recurse: bool) -> tuple[int, list[KVEntry]]:
        if recurse:
            found = [e for k, e in sorted(self.kv.entries.items()) if k.startswith(key)]
        else:
            e = self.kv.entries.get(key)
            found = [e] if e else []
        return self._kv_rel_index(key, recurse), found

    def kv_keys(self, prefix: str, separator: str) -> tuple[int, list[str]]:
        out: list[str] = []
        for k in sorted(self.kv.entries):
            if not k.startswith(prefix):
                continue
            if separator:
                cut = k.find(separator, len(prefix))
                if cut != -1:
                    k = k[: cut + len(separator)]
            if not out or out[-1] != k:
                out.append(k)
        return self._kv_rel_index(prefix, True), out

    def _kv_set(self, kv: KVState, key: str, value: bytes | None, flags: int, idx: int) -> KVEntry:
        e = kv.entries.get(key)
        if e is None:
            e = KVEntry(key=key, value=value, flags=flags, session=None, lock_index=0, create_index=idx, modify_index=idx)
            kv.entries[key] = e
            kv.tombstones.pop(key, None)
        else:
            e.value = value
            e.flags = flags
            e.modify_index = idx
        return e

    def _kv_cas(self, kv: KVState, key: str, value: bytes | None, flags: int, cas: int, idx: int) -> KVEntry | None:
        e = kv.entries.get(key)
        if cas == 0 and e is not None:
            return None
        if cas != 0 and (e is None or e.modify_index != cas):
            return None
        return self._kv_set(kv, key, value, flags, idx)

    def _kv_lock(
        self, kv: KVState, key: str, value: bytes | None, flags: int, session: str, idx: int
    ) -> KVEntry | None:
        if self.lock_delays.get(key, 0.0) > self.clock():
            return None
        if session not in self.sessions:
            raise ConsulError(500, f'invalid session "{session}"')
        e = kv.entries.get(key)
        if e is not None and e.session and e.session != session:
            return None
        held = e is not None and e.session == session
        e = self._kv_set(kv, key, value, flags, idx)
        if not held:
            e.session = session
            e.lock_index += 1
        return e

    def _kv_unlock(
        self, kv: KVState, key: str, value: bytes | None, flags: int, session: str, idx: int
    ) -> KVEntry | None:
        e = kv.entries.get(key)
        if e is None or e.session != session:
            return None
        e = self._kv_set(kv, key, value, flags, idx)
        e.session = None
        return e

    @staticmethod
    def _kv_delete(kv: KVState, key: str, idx: int) -> bool:
        if kv.entries.pop(key, None) is None:
            return False
        kv.tombstones[key] = idx
        return True

    @classmethod
    def _kv_delete_tree(cls, kv: KVState, prefix: str, idx: int) -> bool:
        keys = [k for k in kv.entries if k.startswith(prefix)]
        for k in keys:
            cls._kv_delete(kv, k, idx)
        return bool(keys)

    def kv_put(
        self,
        key: str,
        value: bytes | None,
        *,
        flags: int,
        cas: int | None,
        acquire: str | None,
        release: str | None,
    ) -> bool:
        """PUT /v1/kv/{key}: True when written. Precedence as Consul's: release, acquire, cas."""
        idx = self._next()
        if release is not None:
            e = self._kv_unlock(self.kv, key, value, flags, release, idx)
        elif acquire is not None:
            e = self._kv_lock(self.kv, key, value, flags, acquire, idx)
        elif cas is not None:
            e = self._kv_cas(self.kv, key, value, flags, cas, idx)
        else:
            e = self._kv_set(self.kv, key, value, flags, idx)
        if e is None:
            return False
        self._touch(idx, "kvs")
        return True

    def kv_delete(self, key: str, *, recurse: bool, cas: int | None) -> bool:
        """DELETE /v1/kv/{key}: False only when a `cas` does not match an existing key."""
        idx = self._next()
        if recurse:
            changed = self._kv_delete_tree(self.kv, key, idx)
        elif cas is not None:
            e = self.kv.entries.get(key)
            if e is None:
                return True
            if e.modify_index != cas:
                return False
            changed = self._kv_delete(self.kv, key, idx)
        else:
            changed = self._kv_delete(self.kv, key, idx)
        if changed:
            self._touch(idx, "kvs")
        return True

    def txn(self, ops: Any) -> tuple[bool, list[dict[str, Json]]]:
        """PUT /v1/txn (KV operations only): (True, results) when every operation succeeded and
        all were applied at one index; (False, errors) and nothing applied otherwise."""
        if not isinstance(ops, list):
            raise ConsulError(400, "Failed to parse body: must be a JSON list of operations")
        if len(ops) > TXN_MAX_OPS:
            raise ConsulError(413, f"Transaction contains too many operations ({len(ops)} > {TXN_MAX_OPS})")
        parsed = []
        for i, op in enumerate(ops):
            kv_op = _field(op, "KV") if isinstance(op, Mapping) else None
            if not isinstance(kv_op, Mapping):
                raise ConsulError(400, f"consul stand-in: operation {i}: only KV operations are implemented in /v1/txn")
            verb = _str_field(kv_op, "Verb")
            key = _str_field(kv_op, "Key")
            raw_value = _field(kv_op, "Value")
            value: bytes | None = None
            if raw_value not in (None, ""):
                try:
                    value = base64.b64decode(raw_value, validate=True)
                except (binascii.Error, TypeError, ValueError):
                    raise ConsulError(400, f"Failed to parse body: operation {i}: Value is not base64")
            if value is not None and len(value) > KV_MAX_VALUE_BYTES:
                raise ConsulError(413, f"Value for key {key!r} is too large ({len(value)} > {KV_MAX_VALUE_BYTES} bytes)")
            flags = _field(kv_op, "Flags") or 0
            index = _field(kv_op, "Index") or 0
            session = _str_field(kv_op, "Session")
            if not isinstance(flags, int) or not isinstance(index, int):
                raise ConsulError(400, f"Failed to parse body: operation {i}: Flags and Index must be integers")
            parsed.append((verb, key, value, flags, index, session))

        idx = self._next()
        work = copy.deepcopy(self.kv)
        results: list[dict[str, Json]] = []
        errors: list[dict[str, Json]] = []
        for i, (verb, key, value, flags, index, session) in enumerate(parsed):
            what: str | None = None
            entry: KVEntry | None = None
            entries: list[KVEntry] = []
            with_value = False
            if verb == "set":
                entry = self._kv_set(work, key, value, flags, idx)
            elif verb == "cas":
                entry = self._kv_cas(work, key, value, flags, index, idx)
                what = None if entry else f'failed to set key "{key}", index is stale'
            elif verb == "lock":
                entry = self._kv_lock(work, key, value, flags, session, idx)
                what = None if entry else f'failed to lock key "{key}", lock is already held'
            elif verb == "unlock":
                entry = self._kv_unlock(work, key, value, flags, session, idx)
                what = None if entry else f'failed to unlock key "{key}", lock isn\'t held, or is held by another session'
            elif verb == "get":
                entry = work.entries.get(key)
                with_value = True
                what = None if entry else f'key "{key}" doesn\'t exist'
            elif verb == "get-tree":
                entries = [e for k, e in sorted(work.entries.items()) if k.startswith(key)]
            elif verb == "check-index":
                entry = work.entries.get(key)
                if entry is None:
                    what = f'key "{key}" doesn\'t exist'
                elif entry.modify_index != index:
                    what = f'current modify index {entry.modify_index} for key "{key}" does not match expected {index}'
            elif verb == "check-session":
                entry = work.entries.get(key)
                if entry is None:
                    what = f'key "{key}" doesn\'t exist'
                elif entry.session != session:
                    what = f'current session {entry.session or ""!r} for key "{key}" does not match {session!r}'
            elif verb == "check-not-exists":
                if key in work.entries:
                    what = f'key "{key}" exists'
            elif verb == "delete":
                self._kv_delete(work, key, idx)
            elif verb == "delete-tree":
                self._kv_delete_tree(work, key, idx)
            elif verb == "delete-cas":
                e = work.entries.get(key)
                if e is not None and e.modify_index != index:
                    what = f'failed to delete key "{key}", index is stale'
                else:
                    self._kv_delete(work, key, idx)
            else:
                what = f'unknown KV verb "{verb}"'
            if what is not None:
                errors.append({"OpIndex": i, "What": what})
                continue
            if entry is not None:
                results.append({"KV": self._kv_json(entry, with_value=with_value)})
            for e in entries:
                results.append({"KV": self._kv_json(e)})
        if errors:
            return False, errors
        if work != self.kv:
            self.kv = work
            self._touch(idx, "kvs")
        return True, results

    # -- sessions -------------------------------------------------------------------------
    def _session_json(self, s: Session) -> dict[str, Json]:
        return {
            "ID": s.id,
            "Name": s.name,
            "Node": s.node,
            "LockDelay": int(round(s.lock_delay_s * 1e9)),
            "Behavior": s.behavior,
            "TTL": s.ttl,
            "NodeChecks": list(s.node_checks),
            "ServiceChecks": [dict(c) for c in s.service_checks] or None,
            "CreateIndex": s.create_index,
            "ModifyIndex": s.modify_index,
        }

    def session_create(self, body: Any) -> str:
        """PUT /v1/session/create: the new session's ID. 400 for bad fields, 500 (as Consul)
        for an unknown node or check, or a check that is critical."""
        if body is None:
            body = {}
        if not isinstance(body, Mapping):
            raise ConsulError(400, "Request decode failed: body must be a JSON object")
        node = _str_field(body, "Node") or self.node_name
        if node != self.node_name:
            raise ConsulError(500, "Missing node registration")
        behavior = _str_field(body, "Behavior") or "release"
        if behavior not in ("release", "delete"):
            raise ConsulError(400, f"Invalid Behavior setting '{behavior}'")
        ttl = _str_field(body, "TTL")
        ttl_s: float | None = None
        if ttl:
            try:
                ttl_s = parse_go_duration_s(ttl)
            except ValueError:
                raise ConsulError(400, f"Request decode failed: time: invalid duration {ttl!r}")
            if ttl_s != 0 and not SESSION_TTL_MIN_S <= ttl_s <= SESSION_TTL_MAX_S:
                raise ConsulError(400, f"Invalid Session TTL '{ttl}', must be between [10s=24h0m0s]")
            if ttl_s == 0:
                ttl_s = None
        lock_delay_raw = _field(body, "LockDelay")
        lock_delay_s = DEFAULT_LOCK_DELAY_S
        if lock_delay_raw is not None:
            lock_delay_s = _duration_field_s(lock_delay_raw, "LockDelay", small_numbers_are_seconds=True)
        lock_delay_s = max(0.0, min(lock_delay_s, MAX_LOCK_DELAY_S))
        node_checks = _field(body, "NodeChecks")
        checks = _field(body, "Checks")
        service_checks_raw = _field(body, "ServiceChecks") or []
        if node_checks is None and checks is None and not service_checks_raw:
            node_checks = [SERF_CHECK_ID]
        all_node_checks = list(node_checks or []) + list(checks or [])
        if not all(isinstance(c, str) for c in all_node_checks) or not isinstance(service_checks_raw, list):
            raise ConsulError(400, "Request decode failed: Checks must be a list of check IDs")
        service_checks: list[dict[str, str]] = []
        for sc in service_checks_raw:
            cid = _str_field(sc, "ID") if isinstance(sc, Mapping) else ""
            if not cid:
                raise ConsulError(400, "Request decode failed: ServiceChecks entries need an ID")
            service_checks.append({"ID": cid, "Namespace": ""})
        for cid in all_node_checks + [c["ID"] for c in service_checks]:
            if cid == SERF_CHECK_ID:
                continue
            check = self.checks.get(cid)
            if check is None:
                raise ConsulError(500, f"Missing check '{cid}' registration")
            if check.status == "critical":
                raise ConsulError(500, f"Check '{cid}' is in critical state")
        idx = self._next()
        sid = str(uuid.uuid4())
        sess = Session(
            id=sid,
            name=_str_field(body, "Name"),
            node=node,
            lock_delay_s=lock_delay_s,
            behavior=behavior,
            ttl=ttl if ttl_s else "",
            ttl_s=ttl_s,
            node_checks=all_node_checks,
            service_checks=service_checks,
            create_index=idx,
            modify_index=idx,
        )
        sess.expires_at = self.clock() + ttl_s if ttl_s else None
        self.sessions[sid] = sess
        self._touch(idx, "sessions")
        return sid

    def session_destroy(self, session_id: str) -> None:
        if session_id in self.sessions:
            self._invalidate_session(session_id, self._next())

    def session_renew(self, session_id: str) -> list[dict[str, Json]]:
        """PUT /v1/session/renew/{id}: restarts the TTL; 404 when the session is gone."""
        s = self.sessions.get(session_id)
        if s is None:
            raise ConsulError(404, f"Session id '{session_id}' not found")
        if s.ttl_s:
            s.expires_at = self.clock() + s.ttl_s
        return [self._session_json(s)]

    def session_info(self, session_id: str) -> tuple[int, list[dict[str, Json]]]:
        s = self.sessions.get(session_id)
        return self.table_index["sessions"], [self._session_json(s)] if s else []

    def session_list(self, node: str | None = None) -> tuple[int, list[dict[str, Json]]]:
        out = [
            self._session_json(s)
            for s in sorted(self.sessions.values(), key=lambda s: s.create_index)
            if node is None or s.node == node
        ]
        return self.table_index["sessions"], out

    def _invalidate_session(self, session_id: str, idx: int) -> None:
        """Destroy a session: release its locks (or delete its keys) and start their lock-delay."""
        s = self.sessions.pop(session_id, None)
        if s is None:
            return
        now = self.clock()
        tables = ["sessions"]
        held = [e for e in self.kv.entries.values() if e.session == session_id]
        for e in held:
            if s.lock_delay_s > 0:
                self.lock_delays[e.key] = now + s.lock_delay_s
            if s.behavior == "delete":
                self._kv_delete(self.kv, e.key, idx)
            else:
                e.session = None
                e.modify_index = idx
        if held:
            tables.append("kvs")
        self._touch(idx, *tables)

    def _invalidate_sessions_of_check(self, check_id: str, idx: int) -> None:
        for s in list(self.sessions.values()):
            if check_id in s.node_checks or any(c["ID"] == check_id for c in s.service_checks):
                self._invalidate_session(s.id, idx)

    # -- timers ---------------------------------------------------------------------------
    def tick(self) -> None:
        """Run what time decides: TTL expiry, reaping of long-critical services, session
        expiry, and forgetting lock-delays that are over."""
        now = self.clock()
        for check in list(self.checks.values()):
            if check.ttl_deadline is not None and now >= check.ttl_deadline and check.check_id in self.checks:
                check.ttl_deadline = None
                prefix = "TTL expired"
                output = f"{prefix} (last output before timeout follows): {check.output}" if check.output else prefix
                self._set_status(check, "critical", output, now)
        for check in list(self.checks.values()):
            if (
                check.service_id
                and check.deregister_after_s is not None
                and check.status == "critical"
                and check.critical_since is not None
                and now - check.critical_since > check.deregister_after_s
                and check.service_id in self.services
            ):
                log.info("reaping service %s: check %s critical for over %ss", check.service_id, check.check_id, check.deregister_after_s)
                self._deregister_service(check.service_id, self._next())
        for s in list(self.sessions.values()):
            if s.expires_at is not None and now >= s.expires_at and s.id in self.sessions:
                log.info("session %s expired (TTL %s)", s.id, s.ttl)
                self._invalidate_session(s.id, self._next())
        for key in [k for k, until in self.lock_delays.items() if until <= now]:
            del self.lock_delays[key]

    # -- persistence ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Json]:
        def entry(e: KVEntry) -> dict[str, Json]:
            d = asdict(e)
            d["value"] = base64.b64encode(e.value).decode() if e.value is not None else None
            return d

        def check(c: Check) -> dict[str, Json]:
            d = asdict(c)
            d.pop("ttl_deadline")
            d.pop("critical_since")
            return d

        def session(s: Session) -> dict[str, Json]:
            d = asdict(s)
            d.pop("expires_at")
            return d

        return {
            "format": "consul-standin/1",
            "node_name": self.node_name,
            "index": self.index,
            "node_index": self.node_index,
            "table_index": dict(self.table_index),
            "service_index": dict(self.service_index),
            "services": [asdict(s) for s in self.services.values()],
            "checks": [check(c) for c in self.checks.values()],
            "kv": [entry(e) for e in self.kv.entries.values()],
            "kv_tombstones": dict(self.kv.tombstones),
            "sessions": [session(s) for s in self.sessions.values()],
        }

    def load_json(self, data: Mapping[str, Json]) -> None:
        """Restore state saved by to_json; every TTL (checks, sessions) starts over now."""
        if data.get("format") != "consul-standin/1":
            raise ValueError(f"not a consul-standin state file (format {data.get('format')!r})")
        now = self.clock()
        self.index = int(data["index"])
        self.node_index = int(data["node_index"])
        self.table_index.update({k: int(v) for k, v in data["table_index"].items()})
        self.service_index = {k: int(v) for k, v in data["service_index"].items()}
        self.services = {d["id"]: Service(**d) for d in data["services"]}
        self.checks = {}
        for d in data["checks"]:
            c = Check(**d)
            c.ttl_deadline = now + c.ttl_s if c.ttl_s else None
            c.critical_since = now if c.status == "critical" else None
            self.checks[c.check_id] = c
        entries = {}
        for d in data["kv"]:
            d = dict(d)
            d["value"] = base64.b64decode(d["value"]) if d["value"] is not None else None
            entries[d["key"]] = KVEntry(**d)
        self.kv = KVState(entries=entries, tombstones={k: int(v) for k, v in data["kv_tombstones"].items()})
        self.sessions = {}
        for d in data["sessions"]:
            s = Session(**d)
            s.expires_at = now + s.ttl_s if s.ttl_s else None
            self.sessions[s.id] = s
        self.dirty = False


def _validate_meta(meta: Mapping[str, str]) -> None:
    """Consul's service-meta rules: at most 64 pairs, keys of [A-Za-z0-9_-] up to 128 chars not
    starting with "consul-", values up to 512 chars. 400 otherwise."""
    if len(meta) > 64:
        raise ConsulError(400, "Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs")
    for k, v in meta.items():
        problem = None
        if not k:
            problem = "Key cannot be blank"
        elif not _META_KEY_RE.match(k):
            problem = "Key contains invalid characters"
        elif len(k) > 128:
            problem = "Key is too long (limit: 128 characters)"
        elif k.startswith("consul-"):
            problem = "Key prefix 'consul-' is reserved for internal use"
        elif len(v) > 512:
            problem = "Value is too long (limit: 512 characters)"
        if problem:
            raise ConsulError(400, f"Invalid Service Meta: Couldn't load metadata pair ('{k}', '{v}'): {problem}")


# -- HTTP ---------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StandIn:
    """The HTTP face of a Store: routes, ACL, blocking queries, persistence after changes."""

    def __init__(self, store: Store, *, acl_token: str | None = None, data_path: Path | None = None) -> None:
        self.store = store
        self.acl_token = acl_token
        self.data_path = data_path
        self.closing = False
        self._changed = asyncio.Event()
        self._blocked: dict[int, tuple[str, int]] = {}
        store.on_change = self._notify

    # -- plumbing -------------------------------------------------------------------------
    def _notify(self) -> None:
        """Wake every parked blocking query (each re-checks its own relevant index)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def save_if_dirty(self) -> None:
        """Write the state to --data (atomically: temp file + rename) if anything changed."""
        if not self.store.dirty or self.data_path is None:
            self.store.dirty = False
            return
        tmp = self.data_path.with_name(self.data_path.name + ".tmp")
        tmp.write_text(json.dumps(self.store.to_json(), separators=(",", ":")))
        os.replace(tmp, self.data_path)
        self.store.dirty = False

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._errors_mw, self._acl_mw, self._persist_mw], client_max_size=REQUEST_MAX_BYTES
        )
        r = self._route
        r(app, "/v1/agent/self", GET=self.agent_self)
        r(app, "/v1/agent/services", GET=self.agent_services)
        r(app, "/v1/agent/service/register", PUT=self.agent_service_register)
        r(app, "/v1/agent/service/deregister/{id}", PUT=self.agent_service_deregister)
        r(app, "/v1/agent/service/{id}", GET=self.agent_service)
        r(app, "/v1/agent/checks", GET=self.agent_checks)
        r(app, "/v1/agent/check/register", PUT=self.agent_check_register)
        r(app, "/v1/agent/check/deregister/{id}", PUT=self.agent_check_deregister)
        r(app, "/v1/agent/check/pass/{id}", PUT=self._ttl_handler("passing"))
        r(app, "/v1/agent/check/warn/{id}", PUT=self._ttl_handler("warning"))
        r(app, "/v1/agent/check/fail/{id}", PUT=self._ttl_handler("critical"))
        r(app, "/v1/agent/check/update/{id}", PUT=self.agent_check_update)
        r(app, "/v1/catalog/services", GET=self.catalog_services)
        r(app, "/v1/catalog/service/{name}", GET=self.catalog_service)
        r(app, "/v1/catalog/nodes", GET=self.catalog_nodes)
        r(app, "/v1/catalog/datacenters", GET=self.catalog_datacenters)
        r(app, "/v1/health/service/{name}", GET=self.health_service)
        r(app, "/v1/health/checks/{name}", GET=self.health_checks)
        r(app, "/v1/kv/{key:.*}", GET=self.kv_get, PUT=self.kv_put, DELETE=self.kv_delete)
        r(app, "/v1/txn", PUT=self.txn)
        r(app, "/v1/session/create", PUT=self.session_create)
        r(app, "/v1/session/destroy/{id}", PUT=self.session_destroy)
        r(app, "/v1/session/renew/{id}", PUT=self.session_renew)
        r(app, "/v1/session/info/{id}", GET=self.session_info)
        r(app, "/v1/session/list", GET=self.session_list)
        r(app, "/v1/session/node/{node}", GET=self.session_node)
        r(app, "/v1/status/leader", GET=self.status_leader)
        r(app, "/v1/status/peers", GET=self.status_peers)
        r(app, "/_standin/stats", GET=self.standin_stats)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    @staticmethod
    def _route(app: web.Application, path: str, **by_method: Handler) -> None:
        async def dispatch(request: web.Request) -> web.StreamResponse:
            handler = by_method.get(request.method)
            if handler is None:
                raise ConsulError(405, f"method {request.method} not allowed")
            return await handler(request)

        app.router.add_route("*", path, dispatch)

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        raise ConsulError(404, "404 page not found")

    @web.middleware
    async def _errors_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ConsulError as e:
            return web.Response(status=e.status, text=e.text, content_type="text/plain")
        except web.HTTPRequestEntityTooLarge as e:
            return web.Response(status=413, text=e.text or "Request body too large", content_type="text/plain")

    @web.middleware
    async def _acl_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.acl_token is not None and not request.path.startswith(("/v1/status/", "/_standin/")):
            token = request.query.get("token") or request.headers.get("X-Consul-Token") or ""
            if not token:
                auth = request.headers.get("Authorization", "")
                if auth[:7].lower() == "bearer ":
                    token = auth[7:].strip()
            if not token:
                raise ConsulError(403, "Permission denied: anonymous token lacks permission")
            if token != self.acl_token:
                raise ConsulError(403, "ACL not found")
        return await handler(request)

    @web.middleware
    async def _persist_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            self.save_if_dirty()

    def _check_query(self, request: web.Request) -> str:
        """Common query checks: unsupported parameters, ?dc, consistency. Returns the effective
        consistency mode for X-Consul-Effective-Consistency."""
        q = request.query
        for p in UNSUPPORTED_QUERY_PARAMS:
            if p in q:
                raise ConsulError(400, f"consul stand-in: ?{p} is not implemented")
        dc = q.get("dc")
        if dc and dc != self.store.datacenter:
            raise ConsulError(500, "No path to datacenter")
        stale, consistent = "stale" in q, "consistent" in q
        if stale and consistent:
            raise ConsulError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        return "stale" if stale else "consistent" if consistent else "leader"

    async def _blocking(
        self, request: web.Request, compute: Callable[[], tuple[int, Any]]
    ) -> tuple[int, Any, dict[str, str]]:
        """Run `compute` (-> (relevant index, body)) as a blocking query. Returns the index
        (at least 1), the body and the query-meta headers."""
        consistency = self._check_query(request)
        q = request.query
        min_index = _query_uint(q, "index", "index") or 0
        wait_s = DEFAULT_WAIT_S
        if "wait" in q:
            try:
                wait_s = parse_go_duration_s(q["wait"])
            except ValueError:
                raise ConsulError(400, "Invalid wait time")
            if wait_s < 0:
                raise ConsulError(400, "Invalid wait time")
        wait_s = min(wait_s, MAX_WAIT_S)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        key = id(request)
        try:
            while True:
                changed = self._changed
                idx, body = compute()
                idx = max(idx, 1)
                remaining = deadline - loop.time()
                if min_index == 0 or idx != min_index or remaining <= 0 or self.closing:
                    break
                self._blocked[key] = (request.path, min_index)
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except TimeoutError:
                    pass
        finally:
            self._blocked.pop(key, None)
        headers = {
            "X-Consul-Index": str(idx),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
            "X-Consul-Effective-Consistency": consistency,
        }
        return idx, body, headers

    async def _blocking_json(self, request: web.Request, compute: Callable[[], tuple[int, Any]]) -> web.Response:
        _, body, headers = await self._blocking(request, compute)
        return web.json_response(body, headers=headers)

    async def _read_body(self, request: web.Request, limit: int = REQUEST_MAX_BYTES) -> bytes:
        if request.content_length is not None and request.content_length > limit:
            raise ConsulError(413, f"Request body({request.content_length} bytes) too large, max size: {limit} bytes.")
        data = await request.read()
        if len(data) > limit:
            raise ConsulError(413, f"Request body({len(data)} bytes) too large, max size: {limit} bytes.")
        return data

    @staticmethod
    def _ok() -> web.Response:
        return web.Response(status=200, text="", content_type="text/plain")

    # -- agent ----------------------------------------------------------------------------
    async def agent_self(self, request: web.Request) -> web.StreamResponse:
        self._check_query(request)
        return web.json_response(self.store.agent_self())

    async def agent_services(self, request: web.Request) -> web.StreamResponse:
        self._check_query(request)
        return web.json_response(self.store.agent_services())

    async def agent_service(self, request: web.Request) -> web.StreamResponse:
        self._check_query(request)
        return web.json_response(self.store.agent_service(request.match_info["id"]))

    async def agent_checks(self, request: web.Request) -> web.StreamResponse:
        self._check_query(request)
        return web.json_response(self.store.agent_checks())

    async def agent_service_register(self, request: web.Request) -> web.StreamResponse:
        body = _decode_json_body(await self._read_body(request))
        replace = _query_flag(request.query, "replace-existing-checks")
        self.store.register_service(body, replace_existing_checks=replace)
        return self._ok()

    async def agent_service_deregister(self, request: web.Request) -> web.StreamResponse:
        self.store.deregister_service(request.match_info["id"])
        return self._ok()

    async def agent_check_register(self, request: web.Request) -> web.StreamResponse:
        self.store.register_check(_decode_json_body(await self._read_body(request)))
        return self._ok()

    async def agent_check_deregister(self, request: web.Request) -> web.StreamResponse:
        self.store.deregister_check(request.match_info["id"])
        return self._ok()

    def _ttl_handler(self, status: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            self.store.update_ttl(request.match_info["id"], status, request.query.get("note", ""))
            return self._ok()

        return handler

    async def agent_check_update(self, request: web.Request) -> web.StreamResponse:
        body = _decode_json_body(await self._read_body(request))
        if not isinstance(body, Mapping):
            raise ConsulError(400, "Request decode failed: body must be a JSON object")
        status = _str_field(body, "Status")
        if status not in HEALTH_STATUSES:
            raise ConsulError(400, f"Invalid check status: '{status}'")
        self.store.update_ttl(request.match_info["id"], status, _str_field(body, "Output"))
        return self._ok()

    # -- catalog and health ---------------------------------------------------------------
    async def catalog_services(self, request: web.Request) -> web.StreamResponse:
        return await self._blocking_json(request, self.store.catalog_services)

    async def catalog_service(self, request: web.Request) -> web.StreamResponse:
        name, tags = request.match_info["name"], request.query.getall("tag", [])
        return await self._blocking_json(request, lambda: self.store.catalog_service(name, tags))

    async def catalog_nodes(self, request: web.Request) -> web.StreamResponse:
        return await self._blocking_json(request, self.store.catalog_nodes)

    async def catalog_datacenters(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([self.store.datacenter])

    async def health_service(self, request: web.Request) -> web.StreamResponse:
        name, tags = request.match_info["name"], request.query.getall("tag", [])
        passing = _query_flag(request.query, "passing")
        return await self._blocking_json(request, lambda: self.store.health_service(name, tags, passing))

    async def health_checks(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        return await self._blocking_json(request, lambda: self.store.health_checks(name))

    # -- KV -------------------------------------------------------------------------------
    async def kv_get(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        q = request.query
        if _query_flag(q, "keys"):
            separator = q.get("separator", "")
            _, keys, headers = await self._blocking(request, lambda: self.store.kv_keys(key, separator))
            if not keys and key:
                return web.Response(status=404, headers=headers)
            return web.json_response(keys, headers=headers)
        recurse = _query_flag(q, "recurse")
        _, entries, headers = await self._blocking(request, lambda: self.store.kv_get(key, recurse))
        if not entries:
            return web.Response(status=404, headers=headers)
        if _query_flag(q, "raw") and not recurse:
            return web.Response(body=entries[0].value or b"", headers=headers, content_type="text/plain")
        return web.json_response([Store._kv_json(e) for e in entries], headers=headers)

    async def kv_put(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        if not key:
            raise ConsulError(400, "Missing key name")
        q = request.query
        self._check_query(request)
        if request.content_length is not None and request.content_length > KV_MAX_VALUE_BYTES:
            raise ConsulError(
                413,
                f"Request body({request.content_length} bytes) too large, max size: {KV_MAX_VALUE_BYTES} bytes. "
                "See https://developer.hashicorp.com/consul/docs/agent/config/config-files#kv_max_value_size.",
            )
        value = await self._read_body(request, KV_MAX_VALUE_BYTES)
        flags = _query_uint(q, "flags", "flags") or 0
        cas = _query_uint(q, "cas", "cas index")
        acquire = q.get("acquire") if "acquire" in q else None
        release = q.get("release") if "release" in q else None
        if acquire == "" or release == "":
            raise ConsulError(400, "Missing session ID")
        ok = self.store.kv_put(key, value or None, flags=flags, cas=cas, acquire=acquire, release=release)
        return web.json_response(ok)

    async def kv_delete(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        q = request.query
        self._check_query(request)
        recurse = _query_flag(q, "recurse")
        if not key and not recurse:
            raise ConsulError(400, "Missing key name")
        cas = _query_uint(q, "cas", "cas index")
        return web.json_response(self.store.kv_delete(key, recurse=recurse, cas=cas))

    async def txn(self, request: web.Request) -> web.StreamResponse:
        self._check_query(request)
        ops = _decode_json_body(await self._read_body(request))
        ok, out = self.store.txn(ops)
        if ok:
            return web.json_response({"Results": out, "Errors": None})
        return web.json_response({"Results": None, "Errors": out}, status=409)

    # -- sessions -------------------------------------------------------------------------
    async def session_create(self, request: web.Request) -> web.StreamResponse:
        self._check_query(request)
        body = _decode_json_body(await self._read_body(request), allow_empty=True)
        return web.json_response({"ID": self.store.session_create(body)})

    async def session_destroy(self, request: web.Request) -> web.StreamResponse:
        self._check_query(request)
        self.store.session_destroy(request.match_info["id"])
        return web.json_response(True)

    async def session_renew(self, request: web.Request) -> web.StreamResponse:
        self._check_query(request)
        return web.json_response(self.store.session_renew(request.match_info["id"]))

    async def session_info(self, request: web.Request) -> web.StreamResponse:
        sid = request.match_info["id"]
        return await self._blocking_json(request, lambda: self.store.session_info(sid))

    async def session_list(self, request: web.Request) -> web.StreamResponse:
        return await self._blocking_json(request, self.store.session_list)

    async def session_node(self, request: web.Request) -> web.StreamResponse:
        node = request.match_info["node"]
        return await self._blocking_json(request, lambda: self.store.session_list(node))

    # -- status and introspection ---------------------------------------------------------
    async def status_leader(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(LEADER_ADDRESS)

    async def status_peers(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([LEADER_ADDRESS])

    async def standin_stats(self, request: web.Request) -> web.StreamResponse:
        s = self.store
        return web.json_response({
            "index": s.index,
            "blocked": [{"path": p, "index": i} for p, i in self._blocked.values()],
            "services": len(s.services),
            "checks": len(s.checks),
            "kv": len(s.kv.entries),
            "sessions": len(s.sessions),
        })

    # -- timers ---------------------------------------------------------------------------
    async def run_timers(self) -> None:
        """Tick the store every TIMER_TICK_S until cancelled, persisting what changed."""
        while True:
            try:
                self.store.tick()
                self.save_if_dirty()
            except Exception:  # a timer bug must not stop TTLs for everyone else
                log.exception("timer tick failed")
            await asyncio.sleep(TIMER_TICK_S)


def _parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen wants HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM/SIGINT; prints the ready line once listening."""
    store = Store(node_name=args.node_name, datacenter=args.datacenter)
    data_path = Path(args.data) if args.data else None
    if data_path is not None and data_path.exists():
        store.load_json(json.loads(data_path.read_text()))
        log.info("restored state from %s at index %d", data_path, store.index)
    standin = StandIn(store, acl_token=args.acl_token, data_path=data_path)
    standin.save_if_dirty()
    runner = web.AppRunner(standin.app(), access_log=log if args.access_log else None, shutdown_timeout=1.0)
    await runner.setup()
    host, port = args.listen
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    timers = asyncio.create_task(standin.run_timers())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(json.dumps({"ready": f"{bound_host}:{bound_port}"}) + "\n")
    sys.stdout.flush()
    await stop.wait()
    standin.closing = True
    standin._notify()
    timers.cancel()
    try:
        await timers
    except asyncio.CancelledError:
        pass
    standin.save_if_dirty()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(
        prog="python -m tests.support.consul_standin",
        description="Consul stand-in (a test double for the HTTP API subset the mesh uses).",
    )
    parser.add_argument("--listen", type=_parse_listen, default=("127.0.0.1", 8500), help="HOST:PORT (port 0: any)")
    parser.add_argument("--acl-token", default=None, help="require this token on every request")
    parser.add_argument("--data", default=None, help="JSON file to persist state to (and restore from)")
    parser.add_argument("--node-name", default="consul-standin", help="the one node's name")
    parser.add_argument("--datacenter", default=DATACENTER, help="the datacenter's name")
    parser.add_argument("--access-log", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
