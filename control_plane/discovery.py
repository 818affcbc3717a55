"""Discovery: the snapshot every sidecar gets, when it is pushed, and what each sidecar runs.

Three parts:

* ``build_snapshot`` (pure): the registry's instances and the config objects -> the one
  ``Snapshot`` every sidecar gets: a cluster per service with at least one inbound address,
  its endpoints sorted by instance id (``healthy`` = the app reports SERVING), an empty
  cluster per service the config names that has none, and a route per service compiled from
  the config (``mesh_common.config.compile_routes``; identity routes without config), and
  the authorization: the AuthorizationPolicy objects with the mesh-wide default
  (``compile_authz``), and the deny-list of revoked certificate serials
  (``control_plane.revocation``; the publisher leaves revoked instances out).
* ``Publisher``: a registry change publishes at once (leading edge); further changes within
  ``push_window_s`` are coalesced into one publish at the end of the window; a config change
  publishes at once (``publish_now``). The version (a decimal integer, monotonic across
  restarts through the ``Store``) is bumped only when the content hash changes.
* ``Session`` / ``SessionHub``: per sidecar stream, what was sent and when, what was ACKed or
  NACKed and when, and the queue of messages to send. ``sync_state`` (pure) names the state:
  SYNCED, SYNCING, NACKED or STALE. A ``PushObserver`` (the control plane's metrics) hears of
  every push, of the time to each version's ACK, and of every NACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

from control_plane.registry import Instance, Key, Registry
from control_plane.store import Store
from mesh_common.config import ConfigObject, compile_authz, compile_routes
from mesh_common.snapshot import (
    Cluster,
    Endpoint,
    Snapshot,
    SnapshotError,
    content_hash,
    from_doc,
    parse_address,
)
from protos.mesh.v1 import control_pb2 as pb

log = logging.getLogger("mesh.control_plane.discovery")

SYNCED = "SYNCED"
SYNCING = "SYNCING"
NACKED = "NACKED"
STALE = "STALE"

DEFAULT_PUSH_WINDOW_S = 0.1
DEFAULT_STALE_AFTER_S = 10.0
MAX_PENDING_QUERIES = 32
MAX_TRUST_CHARS = 128       # reported serials and hashes are cut to this
SNAPSHOT_ZLIB_LEVEL = 6
"""zlib level of ``SnapshotPush.json_zlib``. Compressed once per version, sent to every
sidecar that accepts it. On bench.cp_scale's snapshot (1,000 endpoints, 180 KiB of JSON)
level 1 gives 7.6 KiB, level 6 6.5 KiB (level 9 no less); level 6 costs 0.5-2 ms more, once
per version, and sends 1.1 KiB less to each of the 1,000 sessions (1.1 MB less TLS and
sendmsg per change); a sidecar inflates either in the same time (about 0.1-0.5 ms)."""


@dataclass(frozen=True)
class DiscoverySettings:
    """Tunables of discovery, all in seconds (``test_hooks`` enables TestPushRawSnapshot)."""

    grace_period_s: float = 10.0
    push_window_s: float = DEFAULT_PUSH_WINDOW_S
    report_window_s: float = 60.0
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    test_hooks: bool = False

    @property
    def prune_interval_s(self) -> float:
        """How often the registry is pruned: a quarter of the grace period, at least 0.2 s."""
        return max(0.2, self.grace_period_s / 4)


# ---------------------------------------------------------------------- the snapshot (pure)
def _endpoint(inst: Instance) -> Endpoint | None:
    try:
        host, port = parse_address(inst.inbound, "inbound")
    except SnapshotError:
        return None
    return Endpoint(host, port, inst.spiffe_id, inst.instance_id, inst.labels, inst.serving)


def _preferred(inst: Instance) -> tuple[bool, float, str]:
    return (inst.connected, inst.registered_at, inst.instance_id)


def build_snapshot(instances: Iterable[Instance], version: str,
                   config: Iterable[ConfigObject] = (), *,
                   authz_default: str = "allow", revoked: Iterable[str] = ()) -> Snapshot:
    """The snapshot every sidecar gets, for ``instances`` and the ``config`` objects (a valid
    set, as the config state keeps it).

    One cluster per service that has an instance with an inbound address (outbound-only
    instances are left out), named after the service, endpoints sorted by instance id, plus
    an empty cluster per service the config names without one (its calls fail "no
    endpoints", not "no route"); clusters sorted by name. One route per cluster, compiled
    from the config (``compile_routes``: without config, an identity route). When two
    instances of a service share an address (a replica restarted under a new id while the
    old one is in its grace period) the connected, then most recently registered, one is
    kept. An unparsable inbound address is left out (the server validates addresses at
    registration, so this does not happen). The authorization is the config's
    AuthorizationPolicy objects with ``authz_default`` (``allow``/``deny``; ``compile_authz``).
    ``revoked`` is the deny-list of certificate serials (sorted, without duplicates).
    Raises ``ConfigError`` for an invalid config set. Pure.
    """
    config = tuple(config)
    by_service: dict[str, dict[str, tuple[Instance, Endpoint]]] = {}
    for inst in instances:
        ep = _endpoint(inst) if inst.inbound else None
        if ep is None:
            continue
        eps = by_service.setdefault(inst.service, {})
        held = eps.get(ep.address)
        if held is None or _preferred(inst) > _preferred(held[0]):
            eps[ep.address] = (inst, ep)
    registered = [
        Cluster(name, tuple(sorted((ep for _, ep in eps.values()),
                                   key=lambda e: (e.instance, e.address))))
        for name, eps in by_service.items()]
    routes, empty = compile_routes(config, (c.name for c in registered))
    clusters = tuple(sorted(registered + [Cluster(name, ()) for name in empty],
                            key=lambda c: c.name))
    return Snapshot(version=version, clusters=clusters, routes=routes,
                    authz=compile_authz(config, authz_default),
                    revoked=tuple(sorted(set(revoked))))


@dataclass(frozen=True)
class Published:
    """A snapshot as sent: its version, content hash and JSON document."""

    version: str
    hash: str
    json: str

    def message(self, *, compressed: bool = False) -> pb.ControlMessage:
        """The ``SnapshotPush`` of it: one message object per version and form, shared by
        every session it is sent to (building it copies and checks the whole document,
        hundreds of KB with a thousand endpoints). ``compressed``: the document in
        ``json_zlib`` (zlib, ``SNAPSHOT_ZLIB_LEVEL``, compressed on the first call) instead
        of ``json``, for a sidecar whose Register said it accepts that. Callers must not
        modify it."""
        return self._zlib_message if compressed else self._message

    @functools.cached_property
    def _zlib_message(self) -> pb.ControlMessage:
        return pb.ControlMessage(snapshot=pb.SnapshotPush(
            version=self.version, hash=self.hash,
            json_zlib=zlib.compress(self.json.encode(), SNAPSHOT_ZLIB_LEVEL)))

    @functools.cached_property
    def _message(self) -> pb.ControlMessage:
        return pb.ControlMessage(snapshot=pb.SnapshotPush(version=self.version, hash=self.hash,
                                                          json=self.json))


def raw_published(version: str, text: str) -> Published:
    """A raw (unvalidated) document as a ``Published`` with ``version``; the hash is the
    content hash when ``text`` is a JSON object, else of the text itself."""
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    digest = content_hash(doc) if isinstance(doc, dict) else content_hash({"raw": text})
    return Published(version, digest, text)


# ---------------------------------------------------------------------- the publisher
class Publisher:
    """Publishes the snapshot of the registry and the config (``config()`` returns the current
    objects, ``authz_default()`` the mesh-wide authorization default, ``revoked()`` the
    deny-list of revoked certificate serials, ``excluded()`` the keys of instances left out,
    whose certificate is revoked): at once on a registry
    change after a quiet window, and once at the end of a window for all changes within it.
    Subscribers (``subscribe``) get each new ``Published``; an unchanged content hash
    publishes nothing. Publishes never overlap."""

    def __init__(self, registry: Registry, store: Store | None, push_window_s: float,
                 trust_domain: str | None = None,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 config: Callable[[], Iterable[ConfigObject]] = tuple,
                 authz_default: Callable[[], str] = lambda: "allow",
                 revoked: Callable[[], Iterable[str]] = tuple,
                 excluded: Callable[[], AbstractSet[Key]] = frozenset) -> None:
        self._registry = registry
        self._revoked = revoked      # the deny-list of revoked certificate serials
        self._excluded = excluded    # instances left out of the snapshot (revoked ones)
        self._config = config
        self._authz_default = authz_default
        self._lock = asyncio.Lock()
        self._store = store
        self.push_window_s = push_window_s
        self._trust_domain = trust_domain
        self._sleep = sleep
        self._counter = 0  # without a store
        self._subscribers: list[Callable[[Published], None]] = []
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self.latest: Published | None = None
        self.publishes = 0

    def subscribe(self, fn: Callable[[Published], None]) -> None:
        """Call ``fn(published)`` for every new version, synchronously."""
        self._subscribers.append(fn)

    def changed(self) -> None:
        """The registry changed: publish now, or at the end of the current window."""
        self._dirty.set()

    async def start(self) -> Published | None:
        """Publish the registry's current snapshot, then follow its changes. A first publish
        that fails is logged and retried on the next change (None is returned)."""
        try:
            published: Published | None = await self.publish_now()
        except Exception:
            log.exception("could not publish the first snapshot (retried on the next change)")
            published = None
        if self._unsubscribe is None:
            self._unsubscribe = self._registry.subscribe(self.changed)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="snapshot-publisher")
        return published

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.publish_now()
            except Exception:
                log.exception("could not publish a snapshot (the last one stays)")
            await self._sleep(self.push_window_s)  # what changes meanwhile waits for the end

    async def publish_now(self, *, force: bool = False) -> Published:
        """Build the snapshot of the registry and the config and publish it when its content
        changed, or with ``force`` (a stored config change: every one gets a new version, even
        when it compiles to the same content); returns the latest ``Published``. Raises ``SnapshotError`` or ``ConfigError``
        if the build does not validate (a bug: nothing is published then) or the store's
        error."""
        async with self._lock:
            return await self._publish(force)

    async def _publish(self, force: bool = False) -> Published:
        excluded = self._excluded()
        instances = self._registry.instances()
        if excluded:
            instances = [i for i in instances if i.key not in excluded]
        snap = build_snapshot(instances, "0", self._config(),
                              authz_default=self._authz_default(), revoked=self._revoked())
        doc = snap.to_doc()
        digest = content_hash(doc)
        if self.latest is not None and digest == self.latest.hash and not force:
            return self.latest
        from_doc(doc, self._trust_domain)  # what every sidecar will check, checked first
        version = str(await self._version_for(digest, force))
        doc["version"] = version
        published = Published(version, digest, json.dumps(doc, separators=(",", ":")))
        self.latest = published
        self.publishes += 1
        log.info("snapshot version %s (%s): %d cluster(s), %d endpoint(s), %d route rule(s)",
                 version, digest, len(snap.clusters),
                 sum(len(c.endpoints) for c in snap.clusters),
                 sum(len(r.rules) for r in snap.routes))
        for fn in list(self._subscribers):
            fn(published)
        return published

    async def _version_for(self, digest: str, force: bool = False) -> int:
        if self._store is None:
            self._counter += 1
            return self._counter
        return await asyncio.to_thread(self._store.publish_snapshot, digest, force)

    async def take_version(self) -> str:
        """Consume the next version number without publishing (test hooks)."""
        if self._store is None:
            self._counter += 1
            return str(self._counter)
        return str(await asyncio.to_thread(self._store.take_version_number))


# ---------------------------------------------------------------------- sessions
def sync_state(*, connected: bool, sent_version: str, sent_at: float | None,
               acked_version: str, nack_version: str, now: float,
               stale_after_s: float) -> str:
    """The sync state of one sidecar. Pure.

    * STALE: the stream is down, or the version sent has gone un-ACKed for more than
      ``stale_after_s`` seconds;
    * SYNCED: connected and it ACKed the version last sent;
    * NACKED: the last NACK is for the version sent (and it was not ACKed);
    * SYNCING: the version sent is not ACKed yet, for less than ``stale_after_s``.
    """
    if not connected:
        return STALE
    if sent_version and acked_version == sent_version:
        return SYNCED
    if sent_version and nack_version == sent_version:
        return NACKED
    if sent_at is not None and now - sent_at > stale_after_s:
        return STALE
    return SYNCING


class _Signal:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_SNAPSHOT = _Signal("snapshot")
_CLOSE = _Signal("close")


class QueryFailed(Exception):
    """A query could not be answered: the stream closed, or the sidecar answered an error."""


class PushObserver(Protocol):
    """Hears of a session's pushes and their answers (``control_plane.metrics``)."""

    def snapshot_pushed(self) -> None: ...

    def push_acked(self, seconds: float) -> None: ...

    def push_nacked(self) -> None: ...


class Session:
    """One sidecar's stream: what it registered, what was sent and answered, and the queue
    of messages for it. Created when its Register arrives; ``connected`` until the stream
    ends or a newer stream of the same instance replaces it; ``accepts_zlib`` (its Register's
    ``accepts_zlib_snapshot``): its snapshots are sent compressed. Times are unix seconds."""

    _ids = itertools.count(1)

    def __init__(self, instance: Instance, now: float, *, cert_not_after: float = 0.0,
                 acked_version: str = "", acked_hash: str = "",
                 clock: Callable[[], float] = time.time,
                 observer: PushObserver | None = None,
                 accepts_zlib: bool = False) -> None:
        self.instance = instance
        self.accepts_zlib = accepts_zlib  # its Register: snapshots go as json_zlib
        self.clock = clock
        self.observer = observer
        self._ack_timed = ""  # the version sent whose time to ACK was observed
        self.connected = True
        self.opened_at = now
        self.last_seen = now
        self.cert_not_after = cert_not_after
        # Its identity as it reports it (Register, StateReport): its certificate's serial,
        # the SHA-256 of its trust bundle and of the CA certificate that issued it ("" =
        # not reported); what a CA rotation waits on.
        self.cert_serial = ""
        self.bundle_sha256 = ""
        self.issuer_sha256 = ""
        self.sent_version = ""
        self.sent_hash = ""
        self.sent_at: float | None = None
        self.acked_version = acked_version  # what it says it runs when it registers
        self.acked_hash = acked_hash
        self.acked_at: float | None = now if acked_version else None
        self.nack_version = ""
        self.nack_reason = ""
        self.nack_at: float | None = None
        self.close_reason = ""
        self.close_code = ""  # a gRPC status name to end the stream with; "" = OK
        self.queue: asyncio.Queue[pb.ControlMessage | _Signal] = asyncio.Queue()
        self.pending: dict[str, asyncio.Future[pb.QueryAnswer]] = {}
        self._snapshot: Published | None = None

    @property
    def key(self) -> Key:
        return self.instance.key

    def set_trust(self, cert_serial: str, bundle_sha256: str, issuer_sha256: str) -> bool:
        """Take what the sidecar reports of its identity (each cut to ``MAX_TRUST_CHARS``;
        an empty report, from a sidecar that reports none, changes nothing). True when it
        changed."""
        if not (cert_serial or bundle_sha256 or issuer_sha256):
            return False
        new = (cert_serial[:MAX_TRUST_CHARS], bundle_sha256[:MAX_TRUST_CHARS],
               issuer_sha256[:MAX_TRUST_CHARS])
        if new == (self.cert_serial, self.bundle_sha256, self.issuer_sha256):
            return False
        self.cert_serial, self.bundle_sha256, self.issuer_sha256 = new
        return True

    def state(self, now: float, stale_after_s: float) -> str:
        """``sync_state`` of this session at ``now``."""
        return sync_state(connected=self.connected, sent_version=self.sent_version,
                          sent_at=self.sent_at, acked_version=self.acked_version,
                          nack_version=self.nack_version, now=now, stale_after_s=stale_after_s)

    # ------------------------------------------------------------------ outgoing
    def push_snapshot(self, published: Published) -> bool:
        """Queue ``published`` unless it is already the version sent; a snapshot still waiting
        in the queue is replaced (only the newest one is ever sent). True when queued."""
        if not self.connected:
            return False
        if self._snapshot is None and self.sent_version == published.version \
                and self.sent_hash == published.hash:
            return False
        if self._snapshot is None:
            self.queue.put_nowait(_SNAPSHOT)
        self._snapshot = published
        return True

    def send(self, message: pb.ControlMessage) -> bool:
        """Queue a message (a query, a command); False when the session is closed."""
        if not self.connected:
            return False
        self.queue.put_nowait(message)
        return True

    def close(self, reason: str = "", code: str = "") -> None:
        """End the stream's outgoing side (``outgoing`` returns) and fail pending queries;
        ``code`` (a gRPC status name, "" = OK) and ``reason`` are what the stream ends with.
        Idempotent: the first close decides."""
        if self.connected:
            self.connected = False
            self.close_reason = reason
            self.close_code = code
            self.queue.put_nowait(_CLOSE)
        self.fail_pending(QueryFailed(reason or "the sidecar's stream closed"))

    async def outgoing(self) -> AsyncIterator[pb.ControlMessage]:
        """The messages to write to the stream, in order, until ``close``. A snapshot is
        recorded as sent when it is handed out."""
        while True:
            item = await self.queue.get()
            if item is _CLOSE:
                return
            if item is _SNAPSHOT:
                published, self._snapshot = self._snapshot, None
                if published is None:
                    continue
                self.sent_version, self.sent_hash = published.version, published.hash
                self.sent_at = self.clock()
                if self.observer is not None:
                    self.observer.snapshot_pushed()
                yield published.message(compressed=self.accepts_zlib)
            elif isinstance(item, pb.ControlMessage):
                yield item

    # ------------------------------------------------------------------ incoming
    def on_ack(self, version: str, digest: str, now: float) -> None:
        """The sidecar runs ``version``; the first ACK of the version sent tells the observer
        the seconds since it was sent."""
        self.acked_version, self.acked_hash, self.acked_at = version, digest, now
        if (self.observer is not None and version and version == self.sent_version
                and self.sent_at is not None and self._ack_timed != version):
            self._ack_timed = version
            self.observer.push_acked(now - self.sent_at)

    def on_nack(self, version: str, reason: str, now: float) -> None:
        self.nack_version, self.nack_reason, self.nack_at = version, reason, now
        if self.observer is not None:
            self.observer.push_nacked()

    # ------------------------------------------------------------------ queries
    def query(self, kind: str) -> tuple[str, asyncio.Future[pb.QueryAnswer]]:
        """Queue a ``Query`` of ``kind``; returns its id and the future its answer resolves.
        Raises QueryFailed when closed or too many queries are pending. Needs a running loop."""
        if not self.connected:
            raise QueryFailed("the sidecar is not connected")
        if len(self.pending) >= MAX_PENDING_QUERIES:
            raise QueryFailed("too many queries pending for this sidecar")
        qid = f"q{next(self._ids)}"
        fut: asyncio.Future[pb.QueryAnswer] = asyncio.get_running_loop().create_future()
        self.pending[qid] = fut
        self.send(pb.ControlMessage(query=pb.Query(id=qid, kind=kind)))
        return qid, fut

    def answer(self, answer: pb.QueryAnswer) -> bool:
        """Resolve the pending query ``answer.id``; False for an unknown (or late) id."""
        fut = self.pending.pop(answer.id, None)
        if fut is None or fut.done():
            return False
        fut.set_result(answer)
        return True

    def forget_query(self, qid: str) -> None:
        fut = self.pending.pop(qid, None)
        if fut is not None and not fut.done():
            fut.cancel()

    def fail_pending(self, exc: Exception) -> None:
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: no "never retrieved" warning if nobody waits


class SessionHub:
    """The current session of every sidecar, connected or not (a disconnected one is kept
    until its instance leaves the registry, so its last versions stay visible)."""

    def __init__(self) -> None:
        self._sessions: dict[Key, Session] = {}

    def open(self, session: Session) -> Session | None:
        """Make ``session`` the current one of its instance; an older connected one is
        closed (a newer stream replaces it) and returned."""
        old = self._sessions.get(session.key)
        self._sessions[session.key] = session
        if old is not None and old is not session and old.connected:
            old.close("replaced by a newer stream of the same instance", "ABORTED")
            return old
        return None

    def close(self, session: Session) -> bool:
        """Close ``session`` (its stream has ended); True when it was its instance's current
        session (then the instance is disconnected, else a newer stream has taken over)."""
        session.close()
        return self._sessions.get(session.key) is session

    def get(self, key: Key) -> Session | None:
        return self._sessions.get(key)

    def sessions(self) -> list[Session]:
        return [self._sessions[k] for k in sorted(self._sessions)]

    def connected(self) -> list[Session]:
        return [s for s in self.sessions() if s.connected]

    def forget(self, key: Key) -> None:
        """Drop the session of an instance that left the registry (closing it if open)."""
        session = self._sessions.pop(key, None)
        if session is not None:
            session.close("the instance left the registry", "UNAVAILABLE")

    def broadcast(self, published: Published) -> int:
        """Queue ``published`` to every connected session; returns how many got it."""
        return sum(s.push_snapshot(published) for s in self.connected())

    def close_all(self, reason: str) -> None:
        for s in self.connected():
            s.close(reason, "UNAVAILABLE")
