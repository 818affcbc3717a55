"""The Consul registry: instances as Consul agent services, kept in memory as well so every
method answers at once, and shared with the other control-plane replicas through Consul's
catalog.

**What an instance becomes in Consul.** One agent service per instance:

* ID ``<prefix>-<service>-<instance_id>-<hash>`` (``service_id``): the readable part with every
  character outside ``[A-Za-z0-9_.-]`` replaced by ``_`` and cut to 96 characters, then 16 hex
  digits of SHA-256 over (prefix, service, instance id). The hash keeps IDs unique where
  sanitizing or a ``-`` inside a name would make two instances share one.
* Name = the service; Address/Port = its inbound listener (an outbound-only sidecar has none
  and stays registered, through its Meta); Tags ``["mesh"]``.
* Meta (Consul allows 64 pairs, keys of ``[A-Za-z0-9_-]`` up to 128 characters, values up to
  512 bytes): the mesh's fields as ``mesh_v`` (encoding version, "1"), ``mesh_prefix``,
  ``mesh_instance_id``, ``mesh_spiffe_id``, ``mesh_outbound``, ``mesh_admin``,
  ``mesh_health``, ``mesh_registered_at``, ``mesh_connected`` ("true"/"false"),
  ``mesh_disconnected_at`` (unix seconds, when disconnected), ``mesh_replica`` (the owning
  control-plane replica) and ``mesh_incarnation`` (that replica's process); empty fields are
  left out. A label ``KEY=VALUE`` is ``label_<KEY escaped>``: ``_`` as ``__``, ``.`` as
  ``_d``, ``/`` as ``_s`` (mesh label keys are ``[A-Za-z0-9-_./]``). What does not fit (a key
  longer than 128 escaped, a value over 512 bytes, more pairs than 64) goes into one JSON
  document ``{"f": fields, "l": labels}`` cut into 512-character values ``mesh_overflow_0``,
  ``mesh_overflow_1``, ...; labels move there from the end of the sorted list until the pairs
  fit. Should even that not fit (tens of kilobytes of labels), labels are dropped from the
  end, ``mesh_truncated`` is "true", a warning is logged and ``meta_truncations`` counts it:
  memory keeps them all, the other replicas see fewer.
* One TTL check, ``service:<ID>``, "its control plane still hears it" (not the app's health,
  which is ``mesh_health``): passed every ``ttl_s / 3`` while the instance is connected on
  this replica, failed when its stream ends. Its DeregisterCriticalServiceAfter is
  ``max(60 s, grace_period_s + ttl_s)`` (Consul will not reap sooner than a minute): a last
  resort when every replica is gone; removing instances is ``prune``'s job, which
  deregisters them explicitly.

**Ownership.** The instances this replica registered are its own and memory is their truth:
a watch that shows one missing or different in Consul puts it back. Instances registered by
other replicas come from the watch: disconnected when their Meta says so, when their TTL check
is critical or the node's health is (then since the moment this replica saw it), and gone when
they leave the catalog. When the same instance shows up registered later by another replica
(its sidecar moved), that one wins: the newest ``registered_at`` owns it (ties broken by replica
then incarnation), and the older owner stops writing it and deregisters its own copy. A
replica restarted with the same ``replica_id`` sees its previous life's instances as
disconnected from the restart, as the embedded registry does; after the grace period its
``prune`` deregisters them. ``prune`` removes expired instances of other replicas too (their
owner may be gone): from memory, and from Consul when the local agent holds that same copy.

**Threads.** Methods run on the event loop thread and never wait on I/O: they change memory and
queue a write. Between ``start`` and ``close`` one writer thread sends the queued writes and
the TTL passes (the latest state per instance, in order); one thread runs a blocking query on
``/v1/catalog/services`` and one per mesh service on ``/v1/health/service/NAME?tag=mesh``
(dedicated threads: a parked query must not hold a worker of the loop's executor). Changes
they see are merged on the loop thread (``call_soon_threadsafe``) and told to subscribers
there. ``close`` stops the watches and waits up to ``close_timeout_s`` for the pending
writes. Consul unreachable: memory keeps serving, every thread retries with backoff (up to
``max_backoff_s``), one warning per outage (``consul_outages`` counts them,
``consul_errors`` the failed requests, ``consul_reachable`` says now) and one line when it is
back; pending writes and the view catch up then.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import consul
from consul.callback import CB

from control_plane.consul_conn import (
    MIN_QUERY_INTERVAL_S,
    BlockingIndex,
    ConsulTarget,
    blocking_get,
    connect,
    go_duration,
    is_outage,
    target_from_env,
)
from control_plane.registry import (
    HEALTH_VALUES,
    Instance,
    Key,
    Registry,
    expired,
    normalize_health,
)

log = logging.getLogger("mesh.control_plane.registry.consul")

MESH_TAG = "mesh"
META_VERSION = "1"
META_MAX_PAIRS = 64
META_MAX_KEY_CHARS = 128
META_MAX_VALUE_BYTES = 512
LABEL_META_PREFIX = "label_"
OVERFLOW_META_PREFIX = "mesh_overflow_"
MIN_DEREGISTER_AFTER_S = 60.0
"""Consul's floor for DeregisterCriticalServiceAfter."""
DEFAULT_TTL_S = 6.0
DEFAULT_WATCH_WAIT_S = 30.0
DEFAULT_MAX_BACKOFF_S = 5.0
DEFAULT_INITIAL_SYNC_S = 3.0
DEFAULT_CLOSE_TIMEOUT_S = 5.0
REPLICA_ID_FILE = "consul-replica-id"
REASSERT_MIN_INTERVAL_S = 1.0
"""An instance of ours that Consul shows otherwise is put back at most this often."""
_ID_READABLE_CHARS = 96
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_META_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")

Order = tuple[float, str, str]
"""Who owns an instance in Consul, comparable: (registered_at, replica, incarnation)."""


# ---------------------------------------------------------------------- pure encoding
def validate_prefix(prefix: str) -> str:
    """``prefix`` when it is 1-64 characters of ``[A-Za-z0-9_.-]``; raises ValueError."""
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"the Consul prefix must be 1-64 of [A-Za-z0-9_.-], got {prefix!r}")
    return prefix


def service_id(prefix: str, service: str, instance_id: str) -> str:
    """The Consul service ID of an instance (see the module docstring); only
    ``[A-Za-z0-9_.-]``, at most 113 characters, a different ID for every (prefix, service,
    instance_id)."""
    readable = _ID_UNSAFE.sub("_", f"{prefix}-{service}-{instance_id}")[:_ID_READABLE_CHARS]
    digest = hashlib.sha256("\0".join((prefix, service, instance_id)).encode()).hexdigest()
    return f"{readable}-{digest[:16]}"


def check_id(sid: str) -> str:
    """The ID of the TTL check of service ``sid`` (Consul's own default for a single check)."""
    return f"service:{sid}"


def label_meta_key(label: str) -> str:
    """``label_`` + the label key escaped for Consul meta (``_``->``__``, ``.``->``_d``,
    ``/``->``_s``); other characters are kept (they may make the key invalid: see
    ``encode_meta``)."""
    return LABEL_META_PREFIX + label.replace("_", "__").replace(".", "_d").replace("/", "_s")


def label_from_meta_key(key: str) -> str | None:
    """The label key ``label_meta_key`` made ``key`` from, or None when ``key`` is not one."""
    if not key.startswith(LABEL_META_PREFIX):
        return None
    out: list[str] = []
    body = key[len(LABEL_META_PREFIX):]
    i = 0
    while i < len(body):
        c = body[i]
        if c != "_":
            out.append(c)
            i += 1
            continue
        nxt = body[i + 1:i + 2]
        if nxt not in ("_", "d", "s"):
            return None
        out.append({"_": "_", "d": ".", "s": "/"}[nxt])
        i += 2
    return "".join(out) or None


def _fits_value(value: str) -> bool:
    return len(value.encode()) <= META_MAX_VALUE_BYTES


def _overflow_chunks(fields: Mapping[str, str], labels: Mapping[str, str]) -> list[str]:
    if not fields and not labels:
        return []
    text = json.dumps({"f": dict(fields), "l": dict(labels)}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True)
    return [text[i:i + META_MAX_VALUE_BYTES] for i in range(0, len(text), META_MAX_VALUE_BYTES)]


def _float_text(value: float) -> str:
    return repr(float(value))


def mesh_fields(inst: Instance, prefix: str, replica: str, incarnation: str) -> dict[str, str]:
    """The mesh's fields of ``inst`` as Meta would hold them (empty ones left out)."""
    fields = {
        "mesh_v": META_VERSION,
        "mesh_prefix": prefix,
        "mesh_instance_id": inst.instance_id,
        "mesh_spiffe_id": inst.spiffe_id,
        "mesh_outbound": inst.outbound,
        "mesh_admin": inst.admin,
        "mesh_health": inst.health,
        "mesh_registered_at": _float_text(inst.registered_at),
        "mesh_connected": "true" if inst.connected else "false",
        "mesh_disconnected_at": (_float_text(inst.disconnected_at)
                                 if inst.disconnected_at is not None else ""),
        "mesh_replica": replica,
        "mesh_incarnation": incarnation,
    }
    return {k: v for k, v in fields.items() if v}


def encode_meta(inst: Instance, prefix: str, replica: str,
                incarnation: str) -> tuple[dict[str, str], bool]:
    """The service Meta for ``inst`` owned by (``replica``, ``incarnation``), and whether labels
    had to be dropped (see the module docstring). Pure; the result always satisfies Consul's
    meta rules."""
    direct: dict[str, str] = {}
    spilled_fields: dict[str, str] = {}
    for k, v in mesh_fields(inst, prefix, replica, incarnation).items():
        (direct if _fits_value(v) else spilled_fields)[k] = v
    label_pairs: list[tuple[str, str, str]] = []  # (meta key, label, value), in label order
    spilled_labels: dict[str, str] = {}
    for label, value in inst.labels:
        mk = label_meta_key(label)
        if len(mk) <= META_MAX_KEY_CHARS and _META_KEY_RE.match(mk) and _fits_value(value):
            label_pairs.append((mk, label, value))
        else:
            spilled_labels[label] = value
    # Keep the first ``kept`` labels as pairs, the rest in the overflow document: the most
    # pairs that fit (a pair moved to the overflow may not free a slot, so try each count).
    for kept in range(min(len(label_pairs), META_MAX_PAIRS - len(direct)), -1, -1):
        rest = dict(spilled_labels)
        rest.update({label: value for _, label, value in label_pairs[kept:]})
        if len(direct) + kept + len(_overflow_chunks(spilled_fields, rest)) <= META_MAX_PAIRS:
            meta = dict(direct)
            meta.update({mk: value for mk, _, value in label_pairs[:kept]})
            meta.update({f"{OVERFLOW_META_PREFIX}{i}": chunk
                         for i, chunk in enumerate(_overflow_chunks(spilled_fields, rest))})
            return meta, False
    # Even the overflow does not fit: keep the most labels that do (in order), drop the rest.
    every = sorted({**spilled_labels, **{lb: v for _, lb, v in label_pairs}}.items())
    lo, hi = 0, len(every)
    budget = META_MAX_PAIRS - len(direct) - 1  # mesh_truncated takes one pair
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(_overflow_chunks(spilled_fields, dict(every[:mid]))) <= budget:
            lo = mid
        else:
            hi = mid - 1
    chunks = _overflow_chunks(spilled_fields, dict(every[:lo]))
    if len(chunks) > budget:
        raise ValueError("the instance's own fields do not fit in Consul's service meta")
    meta = dict(direct)
    meta.update({f"{OVERFLOW_META_PREFIX}{i}": c for i, c in enumerate(chunks)})
    meta["mesh_truncated"] = "true"
    return meta, True


@dataclass(frozen=True)
class Decoded:
    """An instance read back from Consul: the instance as its Meta describes it (connected as
    the owner said), its owner, and whether its labels were truncated."""

    instance: Instance
    replica: str
    incarnation: str
    truncated: bool

    @property
    def order(self) -> Order:
        return (self.instance.registered_at, self.replica, self.incarnation)


def _join_address(address: str, port: int) -> str:
    if not port:
        return ""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _split_address(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return "", 0
    return host.strip("[]"), int(port)


def decode_service(name: str, address: str, port: int,
                   meta: Mapping[str, str]) -> Decoded | None:
    """The instance a Consul service (``name``, ``address``, ``port``, ``meta``) describes, or
    None when its Meta is not a mesh instance in this encoding (or is damaged)."""
    if meta.get("mesh_v") != META_VERSION:
        return None
    fields = {k: v for k, v in meta.items() if k.startswith("mesh_")}
    labels: dict[str, str] = {}
    for k, v in meta.items():
        label = label_from_meta_key(k)
        if label is not None:
            labels[label] = v
    chunks: list[str] = []
    while f"{OVERFLOW_META_PREFIX}{len(chunks)}" in meta:
        chunks.append(meta[f"{OVERFLOW_META_PREFIX}{len(chunks)}"])
    if chunks:
        try:
            doc = json.loads("".join(chunks))
            fields.update({str(k): str(v) for k, v in doc.get("f", {}).items()})
            labels.update({str(k): str(v) for k, v in doc.get("l", {}).items()})
        except (ValueError, AttributeError):
            return None
    try:
        registered_at = float(fields.get("mesh_registered_at", "0"))
        disc_text = fields.get("mesh_disconnected_at", "")
        disconnected_at = float(disc_text) if disc_text else None
    except ValueError:
        return None
    iid = fields.get("mesh_instance_id", "")
    if not iid or not math.isfinite(registered_at):
        return None
    connected = fields.get("mesh_connected", "true") == "true"
    inst = Instance(name, iid, fields.get("mesh_spiffe_id", ""), _join_address(address, port),
                    fields.get("mesh_outbound", ""), fields.get("mesh_admin", ""),
                    tuple(sorted(labels.items())), normalize_health(fields.get("mesh_health", "")),
                    connected=connected,
                    disconnected_at=None if connected else (disconnected_at or registered_at),
                    registered_at=registered_at)
    return Decoded(inst, fields.get("mesh_replica", ""), fields.get("mesh_incarnation", ""),
                   fields.get("mesh_truncated") == "true")


@dataclass(frozen=True)
class Observed:
    """One entry of ``/v1/health/service/NAME`` that is a mesh instance of ``prefix``."""

    decoded: Decoded
    service_id: str
    meta: dict[str, str]
    address: str
    port: int
    check_status: str      # of its TTL check: passing, warning, critical ("" = none)
    node_critical: bool    # a node-level check (serfHealth...) is critical

    @property
    def key(self) -> Key:
        return self.decoded.instance.key


def parse_health_entry(entry: Mapping[str, Any], prefix: str) -> Observed | None:
    """A ``/v1/health/service`` entry as ``Observed``, or None when it is not an instance of
    this mesh (another prefix, no mesh Meta, or an ID that is not the one its fields give)."""
    svc = entry.get("Service") or {}
    meta = svc.get("Meta") or {}
    if not isinstance(meta, dict) or meta.get("mesh_prefix") != prefix:
        return None
    name = str(svc.get("Service", ""))
    address = str(svc.get("Address") or "")
    port = svc.get("Port") or 0
    if not isinstance(port, int):
        return None
    decoded = decode_service(name, address, port, meta)
    if decoded is None:
        return None
    sid = str(svc.get("ID", ""))
    if sid != service_id(prefix, name, decoded.instance.instance_id):
        return None
    status, node_critical = "", False
    for check in entry.get("Checks") or []:
        if check.get("CheckID") == check_id(sid):
            status = str(check.get("Status", ""))
        elif not check.get("ServiceID") and check.get("Status") == "critical":
            node_critical = True
    return Observed(decoded, sid, dict(meta), address, port, status, node_critical)


def deregister_after_s(grace_period_s: float, ttl_s: float) -> float:
    """DeregisterCriticalServiceAfter in seconds: ``max(60, ceil(grace + ttl))``."""
    return max(MIN_DEREGISTER_AFTER_S, float(math.ceil(grace_period_s + ttl_s)))


def load_replica_id(data_dir: Path) -> str:
    """This replica's id, kept in ``<data_dir>/consul-replica-id`` (made on first use from the
    host name and a random suffix) so a restarted replica knows its own instances. Blocking
    I/O: call it at start-up."""
    path = data_dir / REPLICA_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text().strip()
        if text:
            return text
    host = _ID_UNSAFE.sub("_", socket.gethostname())[:48] or "host"
    rid = f"{host}-{secrets.token_hex(4)}"
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(rid + "\n")
    return rid


# ---------------------------------------------------------------------- writes
@dataclass(frozen=True)
class _Put:
    """Register (or re-register) an instance we own, then pass or fail its check."""

    sid: str
    name: str
    address: str
    port: int
    meta: dict[str, str]
    check: dict[str, str]
    connected: bool
    note: str


@dataclass(frozen=True)
class _Delete:
    """Deregister ``sid`` if the local agent's copy is still the one ``guard`` names
    (``mesh_replica``, ``mesh_incarnation``, ``mesh_registered_at``)."""

    sid: str
    guard: tuple[str, str, str]


_Op = _Put | _Delete


class _Outage(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Reachability:
    """Whether Consul answers, shared by the threads: one warning when an outage starts, one
    line when it ends, counters."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._lock = threading.Lock()
        self.reachable = True
        self.outages = 0
        self.errors = 0
        self._down_since = 0.0

    def failure(self, exc: BaseException) -> None:
        with self._lock:
            self.errors += 1
            if not self.reachable:
                return
            self.reachable = False
            self.outages += 1
            self._down_since = time.monotonic()
        log.warning("Consul at %s cannot be used (%s): serving the registry from memory, "
                    "retrying", self._url, _short(exc))

    def success(self, started: float) -> None:
        """A request sent at ``started`` (monotonic s) succeeded: the outage (if one began
        before it was sent) is over."""
        with self._lock:
            if self.reachable or started < self._down_since:
                return
            self.reachable = True
            down_s = time.monotonic() - self._down_since
        log.info("Consul at %s answers again after %.1f s; catching up", self._url, down_s)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


@dataclass
class _Watch:
    """A health watch of one service: its thread stops when ``stop`` is set."""

    name: str
    stop: threading.Event


class ConsulRegistry(Registry):
    """The registry on Consul (see the module docstring). ``target``: where Consul is;
    ``prefix``: this mesh's namespace in Consul; ``replica_id``: this control plane (stable
    across restarts, ``load_replica_id``); ``ttl_s``: the TTL of the instances' checks;
    ``watch_wait_s``: how long a blocking query waits; ``clock``: unix seconds, for what the
    watch sees (method calls bring their own ``now``)."""

    def __init__(self, target: ConsulTarget, grace_period_s: float, *, prefix: str = "mesh",
                 replica_id: str, ttl_s: float = DEFAULT_TTL_S,
                 watch_wait_s: float = DEFAULT_WATCH_WAIT_S,
                 max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
                 initial_sync_s: float = DEFAULT_INITIAL_SYNC_S,
                 close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
                 request_timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(grace_period_s)
        if not replica_id or len(replica_id) > 128:
            raise ValueError("replica_id: 1-128 characters")
        if not (0 < ttl_s <= 3600) or not (0 < watch_wait_s <= 600):
            raise ValueError("ttl_s must be in (0, 3600] and watch_wait_s in (0, 600]")
        self.target = target
        self.prefix = validate_prefix(prefix)
        self.replica_id = replica_id
        self.incarnation = secrets.token_hex(8)
        self.ttl_s = ttl_s
        self.watch_wait_s = watch_wait_s
        self.max_backoff_s = max_backoff_s
        self.initial_sync_s = initial_sync_s
        self.close_timeout_s = close_timeout_s
        self.request_timeout_s = request_timeout_s
        self._clock = clock
        self._reach = _Reachability(target.url)
        self.meta_truncations = 0
        # The view and its bookkeeping: the loop thread only.
        self._by_key: dict[Key, Instance] = {}
        self._owned: set[Key] = set()
        self._remote_order: dict[Key, Order] = {}
        self._pruned: dict[Key, Order] = {}          # hidden until it changes or leaves Consul
        self._critical_since: dict[Key, float] = {}
        self._reasserted: dict[Key, float] = {}      # monotonic s of the last put-back
        self._put_back_later: set[Key] = set()
        self._initial: set[str] | None = None
        self._synced: asyncio.Event | None = None
        # Shared with the writer thread, under ``_cond``.
        self._cond = threading.Condition()
        self._pending: dict[Key, _Op] = {}
        self._in_flight: set[Key] = set()
        self._passing: dict[Key, str] = {}           # owned and connected: key -> check id
        self._stopping = False
        self._close_deadline = 0.0
        # Threads.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._watch_lock = threading.Lock()
        self._watches: dict[str, _Watch] = {}
        self._writer: threading.Thread | None = None
        self._started = False
        self._closed = False

    @classmethod
    def from_url(cls, url: str, grace_period_s: float, *, replica_id: str,
                 env: Mapping[str, str] | None = None, **options: Any) -> ConsulRegistry:
        """The registry for ``consul://HOST:PORT`` or ``consuls://HOST:PORT`` with the token and
        TLS settings of ``env`` (default: this process's environment; see
        ``control_plane.consul_conn``). Raises ValueError for a bad URL or setting."""
        target = target_from_env(url, os.environ if env is None else env)
        return cls(target, grace_period_s, replica_id=replica_id, **options)

    # ------------------------------------------------------------------ counters
    @property
    def consul_reachable(self) -> bool:
        """False from the first failed request of an outage until a request succeeds."""
        return self._reach.reachable

    @property
    def consul_outages(self) -> int:
        """Outages seen (each logged once)."""
        return self._reach.outages

    @property
    def consul_errors(self) -> int:
        """Requests to Consul that failed."""
        return self._reach.errors

    def service_id(self, service: str, instance_id: str) -> str:
        """The Consul service ID of an instance of this mesh."""
        return service_id(self.prefix, service, instance_id)

    # ------------------------------------------------------------------ the model
    def register(self, instance: Instance, now: float) -> Instance:
        if instance.health not in HEALTH_VALUES:
            raise ValueError(f"health must be one of {sorted(HEALTH_VALUES)}, got "
                             f"{instance.health!r}")
        stored = replace(instance, connected=True, disconnected_at=None, registered_at=now)
        key = stored.key
        self._by_key[key] = stored
        self._owned.add(key)
        self._remote_order.pop(key, None)
        self._pruned.pop(key, None)
        self._critical_since.pop(key, None)
        self._queue_put(key)
        self._notify()
        return stored

    def set_health(self, service: str, instance_id: str, health: str, now: float) -> bool:
        """As ``Registry.set_health``; an instance another replica owns is False (its own
        replica reports its health)."""
        if health not in HEALTH_VALUES:
            raise ValueError(f"health must be one of {sorted(HEALTH_VALUES)}, got {health!r}")
        key = (service, instance_id)
        inst = self._by_key.get(key)
        if inst is None or key not in self._owned or inst.health == health:
            return False
        self._by_key[key] = replace(inst, health=health)
        self._queue_put(key)
        self._notify()
        return True

    def disconnected(self, service: str, instance_id: str, now: float) -> bool:
        """As ``Registry.disconnected``; an instance another replica owns is False (its stream
        is not here)."""
        key = (service, instance_id)
        inst = self._by_key.get(key)
        if inst is None or key not in self._owned or not inst.connected:
            return False
        self._by_key[key] = replace(inst, connected=False, disconnected_at=now)
        self._queue_put(key)
        self._notify()
        return True

    def prune(self, now: float) -> list[Instance]:
        gone = [i for i in self._by_key.values() if expired(i, now, self.grace_period_s)]
        for inst in gone:
            key = inst.key
            del self._by_key[key]
            self._critical_since.pop(key, None)
            self._reasserted.pop(key, None)
            sid = self.service_id(*key)
            if key in self._owned:
                self._owned.discard(key)
                guard = (self.replica_id, self.incarnation, _float_text(inst.registered_at))
            else:
                order = self._remote_order.pop(key, (inst.registered_at, "", ""))
                self._pruned[key] = order
                guard = (order[1], order[2], _float_text(order[0]))
            self._queue(key, _Delete(sid, guard))
        if gone:
            self._notify()
        return sorted(gone, key=lambda i: i.key)

    def instances(self) -> list[Instance]:
        return [self._by_key[k] for k in sorted(self._by_key)]

    def get(self, service: str, instance_id: str) -> Instance | None:
        return self._by_key.get((service, instance_id))

    def owned(self, service: str, instance_id: str) -> bool:
        """True when this replica owns the instance (registered it here, and no replica has
        registered it since)."""
        return (service, instance_id) in self._owned

    # ------------------------------------------------------------------ queueing writes
    def _desired(self, inst: Instance) -> tuple[_Put, bool]:
        """The write that puts ``inst`` (ours) into Consul, and whether its labels were cut."""
        meta, truncated = encode_meta(inst, self.prefix, self.replica_id, self.incarnation)
        sid = self.service_id(inst.service, inst.instance_id)
        address, port = _split_address(inst.inbound) if inst.inbound else ("", 0)
        check = {
            "CheckID": check_id(sid),
            "Name": "mesh control plane connection",
            "Notes": "passing while the sidecar's discovery stream to its control plane is up",
            "TTL": go_duration(self.ttl_s),
            "DeregisterCriticalServiceAfter": go_duration(
                deregister_after_s(self.grace_period_s, self.ttl_s)),
            "Status": "passing" if inst.connected else "critical",
        }
        note = (f"connected to control plane {self.replica_id}" if inst.connected else
                f"disconnected from control plane {self.replica_id} at {inst.disconnected_at}")
        return _Put(sid, inst.service, address, port, meta, check, inst.connected, note), \
            truncated

    def _queue_put(self, key: Key) -> None:
        inst = self._by_key[key]
        op, truncated = self._desired(inst)
        if truncated:
            self.meta_truncations += 1
            log.warning("%s instance %s: its labels do not fit in Consul's service meta; "
                        "other replicas see only some of them", inst.service, inst.instance_id)
        with self._cond:
            if inst.connected:
                self._passing[key] = check_id(op.sid)
            else:
                self._passing.pop(key, None)
            self._pending[key] = op
            self._cond.notify_all()

    def _queue(self, key: Key, op: _Op) -> None:
        with self._cond:
            self._passing.pop(key, None)
            self._pending[key] = op
            self._cond.notify_all()

    def _busy(self, key: Key) -> bool:
        with self._cond:
            return key in self._pending or key in self._in_flight

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the writer and the watches, and wait up to ``initial_sync_s`` for a first
        full view of the catalog (then go on: the watches keep trying). Idempotent."""
        if self._started or self._closed:
            return
        self._started = True
        log.info("registry: Consul at %s, prefix %s, this replica %s (TTL %g s)",
                 self.target.url, self.prefix, self.replica_id, self.ttl_s)
        self._loop = asyncio.get_running_loop()
        self._synced = asyncio.Event()
        self._writer = threading.Thread(target=self._writer_main, daemon=True,
                                        name="consul-registry-writer")
        self._writer.start()
        threading.Thread(target=self._catalog_main, daemon=True,
                         name="consul-registry-catalog").start()
        try:
            await asyncio.wait_for(self._synced.wait(), self.initial_sync_s)
        except TimeoutError:
            log.warning("no full view of Consul at %s within %.1f s: starting from memory, "
                        "the watch catches up", self.target.url, self.initial_sync_s)

    async def close(self) -> None:
        """Stop the watches, send the pending writes (waiting up to ``close_timeout_s``) and
        stop the writer. Instances are not deregistered: their checks stop being passed.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with self._watch_lock:
            for w in self._watches.values():
                w.stop.set()
        with self._cond:
            self._stopping = True
            self._close_deadline = time.monotonic() + self.close_timeout_s
            self._cond.notify_all()
        writer = self._writer
        if writer is not None:
            deadline = time.monotonic() + self.close_timeout_s + 1.0
            while writer.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        with self._cond:
            left = len(self._pending)
        if left:
            log.error("%d registry change(s) not written to Consul at %s before closing",
                      left, self.target.url)

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued write has been sent (True), or ``timeout_s`` seconds
        (False). Between ``start`` and ``close``."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                if not self._pending and not self._in_flight:
                    return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or self._stop.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us
            loop.call_soon_threadsafe(fn, *args)

    def _backoff_s(self, failures: int) -> float:
        return min(self.max_backoff_s, 0.1 * 2 ** min(failures, 16))

    # ------------------------------------------------------------------ the writer thread
    def _writer_main(self) -> None:
        client = connect(self.target, self.request_timeout_s)
        written: dict[Key, _Put] = {}
        next_ttl = 0.0
        failures = 0
        while True:
            with self._cond:
                while True:
                    if self._pending:
                        break
                    if self._stopping:
                        return
                    wait = next_ttl - time.monotonic()
                    if self._passing and wait <= 0:
                        break
                    self._cond.wait(wait if self._passing else None)
                ops, self._pending = self._pending, {}
                self._in_flight = set(ops)
                passing = dict(self._passing) if not self._stopping and \
                    time.monotonic() >= next_ttl else {}
            started = time.monotonic()
            try:
                self._send(client, ops, written)
                if passing:
                    self._pass_ttls(client, passing, written)
                    next_ttl = time.monotonic() + self.ttl_s / 3
                self._reach.success(started)
                failures = 0
            except Exception as exc:
                failures += 1
                if isinstance(exc, _Outage):
                    self._reach.failure(exc.cause)
                else:  # a bug here must not end the writer: say so, retry as after an outage
                    log.exception("writing the registry to Consul failed; retrying")
                with self._cond:
                    for key, op in ops.items():
                        if key in self._in_flight:   # not sent: keep it unless a newer one came
                            self._pending.setdefault(key, op)
                    self._in_flight = set()
                    if self._stopping and time.monotonic() >= self._close_deadline:
                        return
                    # Back off: new changes wait too (they only add to what is pending); a
                    # close cuts the wait short once, to try its flush at once.
                    retry_at = time.monotonic() + self._backoff_s(failures)
                    was_stopping = self._stopping
                    while (left_s := retry_at - time.monotonic()) > 0 and \
                            (was_stopping or not self._stopping):
                        self._cond.wait(left_s)
            finally:
                with self._cond:
                    self._in_flight = set()

    def _send(self, client: consul.Consul, ops: dict[Key, _Op],
              written: dict[Key, _Put]) -> None:
        for key, op in ops.items():
            try:
                if isinstance(op, _Put):
                    self._put(client, op)
                    written[key] = op
                else:
                    self._delete(client, op)
                    written.pop(key, None)
            except Exception as exc:
                if is_outage(exc):
                    raise _Outage(exc) from exc
                log.error("Consul refused a write for %s instance %s (dropped): %s",
                          key[0], key[1], _short(exc))
            with self._cond:
                self._in_flight.discard(key)

    def _put(self, client: consul.Consul, op: _Put) -> None:
        client.agent.service.register(op.name, service_id=op.sid, address=op.address or None,
                                      port=op.port or None, tags=[MESH_TAG], meta=op.meta,
                                      check=op.check)
        if op.connected:
            client.agent.check.ttl_pass(check_id(op.sid), notes=op.note)
        else:
            client.agent.check.ttl_fail(check_id(op.sid), notes=op.note)

    def _delete(self, client: consul.Consul, op: _Delete) -> None:
        current = client.http.get(CB.json(), f"/v1/agent/service/{op.sid}",
                                  headers=client.prepare_headers())
        if not current:
            return  # not on this agent (gone, or another node's): nothing of ours to remove
        meta = current.get("Meta") or {}
        held = (meta.get("mesh_replica", ""), meta.get("mesh_incarnation", ""),
                meta.get("mesh_registered_at", ""))
        if held != op.guard:
            return  # registered again since: not ours to remove
        client.agent.service.deregister(op.sid)

    def _pass_ttls(self, client: consul.Consul, passing: dict[Key, str],
                   written: dict[Key, _Put]) -> None:
        for key, cid in passing.items():
            with self._cond:
                if self._passing.get(key) != cid or key in self._pending:
                    continue  # changed meanwhile: the queued write decides
            try:
                if not client.agent.check.ttl_pass(cid, notes=f"connected to control plane "
                                                              f"{self.replica_id}"):
                    op = written.get(key)  # Consul lost it (a restart without data): put back
                    if op is not None and op.connected:
                        self._put(client, op)
            except Exception as exc:
                if is_outage(exc):
                    raise _Outage(exc) from exc
                log.error("passing the check of %s instance %s failed: %s", key[0], key[1],
                          _short(exc))

    # ------------------------------------------------------------------ the watch threads
    def _catalog_main(self) -> None:
        client = connect(self.target, self.request_timeout_s)
        index = BlockingIndex()
        failures = 0
        first = True
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                data, _ = blocking_get(
                    lambda i, w: client.catalog.services(index=i, wait=w), index,
                    self.watch_wait_s)
            except Exception as exc:
                failures += 1
                self._watch_failed(exc, "the catalog's services")
                self._stop.wait(self._backoff_s(failures))
                continue
            failures = 0
            self._reach.success(started)
            try:
                names = {str(n) for n, tags in dict(data or {}).items()
                         if MESH_TAG in (tags or ())}
            except (TypeError, ValueError):
                log.error("Consul's catalog/services answer is not a map of tags: %.200r", data)
                names = set(self._watches)
            if first:
                first = False
                self._call_soon(self._catalog_seen, sorted(names))
            self._set_watched(names)
            self._stop.wait(MIN_QUERY_INTERVAL_S)

    def _set_watched(self, names: set[str]) -> None:
        with self._watch_lock:
            if self._stop.is_set():
                return
            for name in sorted(set(self._watches) - names):
                watch = self._watches.pop(name)
                watch.stop.set()
                self._call_soon(self._merge, name, [], None)
            for name in sorted(names - set(self._watches)):
                watch = _Watch(name, threading.Event())
                self._watches[name] = watch
                threading.Thread(target=self._service_main, args=(watch,), daemon=True,
                                 name=f"consul-registry-watch {name}").start()

    def _service_main(self, watch: _Watch) -> None:
        client = connect(self.target, self.request_timeout_s)
        index = BlockingIndex()
        failures = 0
        while not watch.stop.is_set():
            started = time.monotonic()
            try:
                data, news = blocking_get(
                    lambda i, w: client.health.service(watch.name, index=i, wait=w,
                                                       tag=MESH_TAG),
                    index, self.watch_wait_s)
            except Exception as exc:
                failures += 1
                self._watch_failed(exc, f"service {watch.name}")
                watch.stop.wait(self._backoff_s(failures))
                continue
            failures = 0
            self._reach.success(started)
            if news and not watch.stop.is_set():
                self._call_soon(self._merge, watch.name, list(data or []), watch)
            watch.stop.wait(MIN_QUERY_INTERVAL_S)

    def _watch_failed(self, exc: BaseException, what: str) -> None:
        if self._stop.is_set():
            return
        if not is_outage(exc):
            log.error("watching %s in Consul failed: %s", what, _short(exc))
        self._reach.failure(exc)

    # ------------------------------------------------------------------ merging (loop thread)
    def _catalog_seen(self, names: list[str]) -> None:
        if self._initial is None:
            self._initial = set(names)
            if not self._initial and self._synced is not None:
                self._synced.set()

    def _merge(self, name: str, entries: list[Mapping[str, Any]], watch: _Watch | None) -> None:
        """What Consul holds for service ``name`` now, merged into the view (loop thread)."""
        try:
            self._merge_service(name, entries, watch)
        except Exception:  # a malformed answer must not stop the next merges
            log.exception("merging Consul's view of service %s failed", name)

    def _merge_service(self, name: str, entries: list[Mapping[str, Any]],
                       watch: _Watch | None) -> None:
        if self._closed:
            return
        if watch is not None:
            with self._watch_lock:
                if self._watches.get(name) is not watch:
                    return  # a watch that was stopped: its news is old
        if self._initial is not None and name in self._initial:
            self._initial.discard(name)
            if not self._initial and self._synced is not None:
                self._synced.set()
        now = self._clock()
        best: dict[Key, Observed] = {}
        for entry in entries:
            obs = parse_health_entry(entry, self.prefix)
            if obs is None or obs.key[0] != name:
                continue
            if obs.key not in best or obs.decoded.order > best[obs.key].decoded.order:
                best[obs.key] = obs
        changed = False
        for key, obs in best.items():
            if key in self._owned:
                if self._check_owned(key, obs):
                    continue
                changed = True  # another replica took it over: theirs from here on
            changed |= self._merge_remote(key, obs, now)
        for key, inst in list(self._by_key.items()):
            if inst.service != name or key in best:
                continue
            if key in self._owned:
                if not self._busy(key):
                    self._put_back(key)  # gone from Consul (a reaper, a lost state)
                continue
            del self._by_key[key]
            self._remote_order.pop(key, None)
            self._critical_since.pop(key, None)
            changed = True
        for key in [k for k in self._pruned if k[0] == name and k not in best]:
            del self._pruned[key]
        if changed:
            self._notify()

    def _check_owned(self, key: Key, obs: Observed) -> bool:
        """An instance we own as Consul shows it: True when we keep it (putting it back when
        Consul's copy is not what we wrote), False when a newer registration by another
        replica took it over (we stop writing it and remove our own copy)."""
        local = self._by_key[key]
        mine = (local.registered_at, self.replica_id, self.incarnation)
        ours = (obs.decoded.replica, obs.decoded.incarnation) == (self.replica_id,
                                                                 self.incarnation)
        if not ours and obs.decoded.order > mine:
            self._owned.discard(key)
            self._queue(key, _Delete(obs.service_id, (self.replica_id, self.incarnation,
                                                      _float_text(local.registered_at))))
            log.info("%s instance %s is now held by control plane %s", key[0], key[1],
                     obs.decoded.replica)
            return False
        if self._busy(key):
            return True
        want, _ = self._desired(local)
        expected = decode_service(want.name, want.address, want.port, want.meta)
        if obs.decoded != expected:
            self._put_back(key)  # not what we wrote (a stale write, someone else's edit)
        return True

    def _put_back(self, key: Key) -> None:
        """Write our instance again, at most once a second per instance: an answer older than
        our last write, or a Consul that stores a value differently, cannot turn this into a
        write loop."""
        if key not in self._owned or key not in self._by_key or self._closed:
            self._put_back_later.discard(key)
            return
        wait_s = self._reasserted.get(key, -math.inf) + REASSERT_MIN_INTERVAL_S \
            - time.monotonic()
        if wait_s <= 0:
            self._reasserted[key] = time.monotonic()
            self._put_back_later.discard(key)
            self._queue_put(key)
        elif key not in self._put_back_later and self._loop is not None:
            self._put_back_later.add(key)   # too soon: once, when it is allowed
            self._loop.call_later(wait_s, self._put_back, key)

    def _merge_remote(self, key: Key, obs: Observed, now: float) -> bool:
        """Another replica's instance into the view; True when the view changed."""
        dec = obs.decoded
        inst = dec.instance
        previous_life = dec.replica == self.replica_id and dec.incarnation != self.incarnation
        connected = (inst.connected and obs.check_status != "critical"
                     and not obs.node_critical and not previous_life)
        if connected:
            self._critical_since.pop(key, None)
            final = replace(inst, connected=True, disconnected_at=None)
        elif previous_life or inst.connected:
            # Ours before a restart (the grace runs from the restart, as after the embedded
            # registry's), or its check went critical: since this replica saw it so.
            final = replace(inst, connected=False,
                            disconnected_at=self._critical_since.setdefault(key, now))
        else:
            final = inst  # its owner marked it disconnected, and when
        tomb = self._pruned.get(key)
        if tomb is not None:
            if tomb == dec.order:
                return False  # pruned here; still in Consul until its owner or a reaper acts
            del self._pruned[key]
        self._remote_order[key] = dec.order
        if self._by_key.get(key) == final:
            return False
        self._by_key[key] = final
        return True
