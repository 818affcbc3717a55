"""Which control-plane replica signs: leader election on a Consul session lock, and the
followers' forwarding to the leader.

With ``--registry consul://...`` several replicas serve one mesh (each its own listeners and
data dir, the same CA files, the state in Consul). One of them, the **leader**, does all the
signing, so serials and certificate records come from one place; the others (**followers**)
serve everything else themselves and forward what needs the CA:

* a ``Bootstrap/Join`` is relayed unchanged to the leader's join address; its answer and
  trailing metadata (the join answer's MAC) come back as they are, as do its errors;
* an ``Identity/Renew`` is authenticated by the follower (the workload's mTLS certificate;
  a revoked one is refused by the API gate first) and signed by the leader through
  ``mesh.v1.Replica/Sign``, over mTLS with the follower's own replica identity
  ``spiffe://<td>/control-plane/<replica-id>`` (a certificate it issues itself at start from
  the CA files every replica holds; the leader serves ``Replica/Sign`` to those identities
  only);
* with no leader known the call is refused UNAVAILABLE ("no leader elected yet"): sidecars
  retry. A forwarded call carries ``FORWARDED_METADATA``; a replica that gets one while it
  does not lead refuses it UNAVAILABLE instead of forwarding again (no loops).

**The election** (Consul's documented leader-election recipe, docs "Application leader
election"): each replica creates a session (``Behavior=release``, ``TTL`` = ``ttl_s``, at
least 10 s; ``LockDelay`` = ``lock_delay_s``), renews it every ``ttl_s / 3`` and tries to
acquire ``<prefix>/leader`` (``PUT ?acquire=SESSION``) with a value naming itself
(``LeaderInfo``: replica id, process incarnation, join and API addresses). It watches the key
with blocking queries and tries again whenever the key has no session (its holder released
it, or Consul invalidated the holder's session; acquiring fails for the lock-delay after an
invalidation). A replica leads while the key's session is its own *and* its last successful
create or renew was sent less than ``lease_s`` (a little under the TTL) ago: Consul
unreachable for longer than that, or the session invalidated (a renew answering 404, a watch
showing another holder), and it no longer signs. A replica that stops cleanly releases the
key and destroys its session at once (no lock-delay: the others take over within a watch
round); one that dies holds it until Consul invalidates the session (the TTL, up to twice it
in Consul), then the lock-delay.

With the embedded registry nothing of this runs: ``SoleLeader`` (the only control plane
leads).

Shape: ``Election`` is the pure decision logic (events in, the next step out, a clock passed
in); ``ConsulLeadership`` is the thread that talks to Consul around it; ``Forwarder`` does the
follower's relaying; ``LeaderMetrics`` exports ``mesh_cp_leader`` (1 while this replica leads)
and ``mesh_cp_forwarded_total{rpc,outcome}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from consul.exceptions import NotFound
from prometheus_client import CollectorRegistry, Counter, Gauge

from control_plane.ca import CertificateAuthority
from control_plane.consul_conn import (
    MIN_QUERY_INTERVAL_S,
    BlockingIndex,
    ConsulTarget,
    blocking_get,
    connect,
    is_outage,
)
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc

log = logging.getLogger("mesh.control_plane.leader")

LEADER_KEY = "leader"
"""The lock's key under the Consul prefix: ``<prefix>/leader``."""
MIN_SESSION_TTL_S = 10.0
"""Consul's floor for a session TTL (and its ceiling is a day)."""
MAX_SESSION_TTL_S = 86400.0
DEFAULT_SESSION_TTL_S = 10.0
DEFAULT_LOCK_DELAY_S = 5.0
MAX_LOCK_DELAY_S = 60.0
"""Consul caps a session's lock-delay at a minute."""
DEFAULT_RETRY_S = 0.5
"""A failed acquire (the key held, or within its lock-delay) is tried again this soon."""
DEFAULT_MAX_BACKOFF_S = 5.0
DEFAULT_INITIAL_WAIT_S = 3.0
"""``ConsulLeadership.start`` waits at most this long for a first view of the key."""
DEFAULT_REQUEST_TIMEOUT_S = 5.0
FORWARD_TIMEOUT_S = 10.0
"""A forwarded call waits at most this long (less when its own deadline is nearer)."""
FORWARDED_METADATA = "mesh-forwarded-by"
"""Metadata of a forwarded call: the replica id of the follower that forwarded it."""
REPLICA_CERT_TTL = dt.timedelta(hours=24)
REPLICA_CERT_REFRESH_S = 12 * 3600.0
"""A follower's channel to the leader is made again (with a new replica certificate) after
this long."""
FORWARD_RPCS = ("join", "renew")
FORWARD_OUTCOMES = ("ok", "refused", "unavailable")
"""``mesh_cp_forwarded_total`` labels: ok (the leader answered), refused (the leader said no:
its status passed back), unavailable (no leader known, or it could not be reached)."""
NO_LEADER = "no leader elected yet: try again"


# ---------------------------------------------------------------------- identities
def replica_spiffe_id(trust_domain: str, replica_id: str) -> str:
    """``spiffe://<td>/control-plane/<replica-id>``: a replica's identity towards the others."""
    return f"spiffe://{trust_domain}/control-plane/{replica_id}"


def replica_of(uri: str, trust_domain: str) -> str | None:
    """The replica id of a replica identity ``uri`` (``replica_spiffe_id``), or None for any
    other identity (a workload, an admin, the serving certificate, another trust domain)."""
    prefix = f"spiffe://{trust_domain}/control-plane/"
    if not uri.startswith(prefix):
        return None
    rid = uri[len(prefix):]
    ok = 0 < len(rid) <= 128 and all(c.isascii() and (c.isalnum() or c in "._-") for c in rid)
    return rid if ok else None


# ---------------------------------------------------------------------- the lock's value
@dataclass(frozen=True)
class LeaderInfo:
    """Who holds (or wants) the lock: the replica id, its process (``incarnation``, new at
    every start: a restarted replica is not its previous life), its join and API addresses
    (``HOST:PORT``, as other hosts reach them) and since when it leads (unix s, 0 = not
    yet)."""

    replica: str
    incarnation: str
    join_address: str
    api_address: str
    since: float = 0.0

    def encode(self) -> bytes:
        """The KV value: compact JSON."""
        return json.dumps({"v": 1, "replica": self.replica, "incarnation": self.incarnation,
                           "join": self.join_address, "api": self.api_address,
                           "since": self.since}, separators=(",", ":"),
                          sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes | str | None) -> LeaderInfo | None:
        """The value ``encode`` made, or None when ``raw`` is not one (absent, not JSON,
        another version, a field missing or of the wrong type)."""
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if not isinstance(doc, dict) or doc.get("v") != 1:
            return None
        fields = [doc.get(k) for k in ("replica", "incarnation", "join", "api")]
        since = doc.get("since", 0.0)
        if not all(isinstance(f, str) and f for f in fields) or \
                not isinstance(since, int | float) or not math.isfinite(since):
            return None
        return cls(*fields, since=float(since))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the decision logic
CREATE_SESSION = "create_session"
RENEW = "renew"
ACQUIRE = "acquire"
WATCH = "watch"
PAUSE = "pause"


@dataclass(frozen=True)
class Step:
    """What the election does next: ``kind`` (``CREATE_SESSION``, ``RENEW``, ``ACQUIRE``,
    ``WATCH`` = a blocking read of the key for at most ``wait_s``, ``PAUSE`` = nothing for
    ``wait_s`` after a failure)."""

    kind: str
    wait_s: float = 0.0


class Election:
    """The pure decision logic of one replica's election (no I/O, no clock of its own: every
    call brings ``now``, monotonic seconds).

    Feed it what happened (``session_created``, ``renewed``, ``session_gone``,
    ``acquired``, ``observed``, ``failed``) and ask ``step(now)`` what to do next; ask
    ``is_leader(now)`` and ``leader(now)`` at any time. ``ttl_s``: the session's TTL;
    renewals every ``ttl_s / 3``; leadership holds for ``lease_s`` after the last confirmed
    renewal was sent (the TTL less a margin: Consul counts from when it got the renewal, so
    it never invalidates the session before the replica has stepped down)."""

    def __init__(self, me: LeaderInfo, ttl_s: float = DEFAULT_SESSION_TTL_S, *,
                 retry_s: float = DEFAULT_RETRY_S,
                 max_backoff_s: float = DEFAULT_MAX_BACKOFF_S) -> None:
        if not MIN_SESSION_TTL_S <= ttl_s <= MAX_SESSION_TTL_S:
            raise ValueError(f"the session TTL must be {MIN_SESSION_TTL_S:g}-"
                             f"{MAX_SESSION_TTL_S:g} s (Consul's bounds), got {ttl_s!r}")
        self.me = me
        self.ttl_s = ttl_s
        self.renew_every_s = ttl_s / 3
        self.lease_s = ttl_s - min(1.0, ttl_s * 0.1)
        self.retry_s = retry_s
        self.max_backoff_s = max_backoff_s
        self.session: str | None = None
        self.index = BlockingIndex()
        """The ``X-Consul-Index`` of the key's watch."""
        self.observed = False
        """The key has been read at least once (or acquired)."""
        self.holder_session: str | None = None
        self.holder: LeaderInfo | None = None
        self.failures = 0
        self._confirmed_at: float | None = None
        self._next_renew = 0.0
        self._acquire_after = 0.0
        self._retry_at = 0.0

    # ------------------------------------------------------------------ what to do
    def step(self, now: float) -> Step:
        """The next thing to do: after a failure a pause (growing backoff), then a session
        when there is none, a renewal when due, an acquire when the key is free (or not read
        yet) and no retry delay runs, else a watch until the next renewal (or retry)."""
        if now < self._retry_at:
            return Step(PAUSE, self._retry_at - now)
        if self.session is None:
            return Step(CREATE_SESSION)
        if now >= self._next_renew:
            return Step(RENEW)
        free = not self.observed or self.holder_session is None
        if free and now >= self._acquire_after:
            return Step(ACQUIRE)
        wake = self._next_renew
        if free:
            wake = min(wake, self._acquire_after)
        return Step(WATCH, max(0.0, wake - now))

    # ------------------------------------------------------------------ what happened
    def session_created(self, session_id: str, sent_at: float) -> None:
        """A session was created by a request sent at ``sent_at``: try the lock at once."""
        self.session = session_id
        self._confirmed(sent_at)
        self._acquire_after = 0.0

    def renewed(self, sent_at: float) -> None:
        """A renewal sent at ``sent_at`` succeeded."""
        self._confirmed(sent_at)

    def session_gone(self) -> None:
        """Consul no longer knows the session (a renew answered 404: invalidated, TTL
        passed): not leader; a new session next."""
        self.session = None
        self._confirmed_at = None
        self.failures = 0
        self._retry_at = 0.0

    def acquired(self, ok: bool, now: float) -> None:
        """The answer to an acquire: ``ok`` = the key is ours now (leader from here on);
        else someone holds it, or its lock-delay runs: retry after ``retry_s`` if it is
        free by then."""
        self.failures = 0
        if ok:
            self.observed = True
            self.holder_session = self.session
            self.holder = self.me
        else:
            self._acquire_after = now + self.retry_s

    def observed_entry(self, entry: Mapping[str, Any] | None) -> None:
        """What a read of the key showed (py-consul's entry dict, None = no key)."""
        self.failures = 0
        self.observed = True
        session = entry.get("Session") if entry else None
        self.holder_session = session if isinstance(session, str) and session else None
        self.holder = LeaderInfo.decode(entry.get("Value")) \
            if entry is not None and self.holder_session else None

    def failed(self, now: float, *, renew_next: bool = False) -> None:
        """A request failed (Consul unreachable, an error answer): pause with a growing
        backoff. ``renew_next``: renew before anything else (a failed acquire may mean the
        session is gone; the renewal finds out)."""
        self.failures += 1
        self._retry_at = now + min(self.max_backoff_s,
                                   self.retry_s * 2.0 ** min(self.failures - 1, 16))
        if renew_next:
            self._next_renew = now

    def _confirmed(self, sent_at: float) -> None:
        self.failures = 0
        self._retry_at = 0.0
        self._confirmed_at = sent_at
        self._next_renew = sent_at + self.renew_every_s

    # ------------------------------------------------------------------ what it means
    def is_leader(self, now: float) -> bool:
        """This replica leads: the key's session is its own and was confirmed less than
        ``lease_s`` ago."""
        return (self.session is not None and self.holder_session == self.session
                and self._confirmed_at is not None and now - self._confirmed_at < self.lease_s)

    def leader(self, now: float) -> LeaderInfo | None:
        """Who leads as far as this replica knows: itself, the holder the key names, or None
        (no holder, a value it cannot read, or a holder naming this replica that is not it
        any more: a previous life's session or its own lapsed one, never to forward to)."""
        if self.is_leader(now):
            return self.me
        if self.holder_session is None or self.holder is None:
            return None
        if self.holder_session == self.session or self.holder.replica == self.me.replica:
            return None
        return self.holder


# ---------------------------------------------------------------------- leadership
class Leadership(ABC):
    """What the RPC handlers ask: does this replica lead, and if not, who does."""

    replica_id: str = ""

    @abstractmethod
    def is_leader(self) -> bool:
        """True while this replica may sign."""

    @abstractmethod
    def leader(self) -> LeaderInfo | None:
        """The leader as far as this replica knows (itself when it leads), None when none is
        known."""

    async def start(self, join_address: str, api_address: str) -> None:
        """Start taking part (this replica's addresses, as other hosts reach them)."""
        return None

    async def stop(self) -> None:
        """Stop taking part; a leader hands over at once. Idempotent."""
        return None

    def describe(self) -> str:
        """One line for logs and meshctl: who leads."""
        leader = self.leader()
        if leader is None:
            return "no leader elected yet"
        return "this replica leads" if self.is_leader() else f"replica {leader.replica} leads"


class SoleLeader(Leadership):
    """The only control plane (embedded registry): it always leads."""

    def __init__(self, replica_id: str = "") -> None:
        self.replica_id = replica_id
        self._me: LeaderInfo | None = None

    def is_leader(self) -> bool:
        return True

    def leader(self) -> LeaderInfo | None:
        return self._me

    async def start(self, join_address: str, api_address: str) -> None:
        self._me = LeaderInfo(self.replica_id, "-", join_address, api_address, time.time())


class ConsulLeadership(Leadership):
    """The election on Consul (see the module docstring), run by one thread between
    ``start`` and ``stop``. ``target``/``prefix``: where the lock lives
    (``<prefix>/leader``); ``replica_id``: this replica (stable across restarts);
    ``ttl_s``/``lock_delay_s``: the session's; ``clock``: monotonic seconds; ``wall``: unix
    seconds (for ``LeaderInfo.since``). ``is_leader``/``leader`` answer at once from memory
    (thread-safe)."""

    def __init__(self, target: ConsulTarget, prefix: str, replica_id: str, *,
                 ttl_s: float = DEFAULT_SESSION_TTL_S,
                 lock_delay_s: float = DEFAULT_LOCK_DELAY_S,
                 retry_s: float = DEFAULT_RETRY_S,
                 max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
                 initial_wait_s: float = DEFAULT_INITIAL_WAIT_S,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        if not MIN_SESSION_TTL_S <= ttl_s <= MAX_SESSION_TTL_S or \
                not 0 <= lock_delay_s <= MAX_LOCK_DELAY_S:
            raise ValueError(f"leader session: TTL {MIN_SESSION_TTL_S:g}-"
                             f"{MAX_SESSION_TTL_S:g} s and lock-delay 0-{MAX_LOCK_DELAY_S:g} s")
        self.target = target
        self.key = f"{prefix}/{LEADER_KEY}"
        self.replica_id = replica_id
        self.incarnation = secrets.token_hex(8)
        self.ttl_s = ttl_s
        self.lock_delay_s = lock_delay_s
        self.retry_s = retry_s
        self.max_backoff_s = max_backoff_s
        self.initial_wait_s = initial_wait_s
        self.request_timeout_s = request_timeout_s
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._election: Election | None = None
        self._stop = threading.Event()
        self._first_view = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: tuple[bool, str] = (False, "")   # nothing known: said at start
        self._unreachable = False
        self._released: set[str] = set()
        self.changes = 0
        """Leadership changes seen (this replica's, or who leads)."""

    # ------------------------------------------------------------------ queries
    def is_leader(self) -> bool:
        """True while this replica's session holds the key (never once ``stop`` began)."""
        with self._lock:
            return self._election is not None and not self._stop.is_set() and \
                self._election.is_leader(self._clock())

    def leader(self) -> LeaderInfo | None:
        with self._lock:
            if self._election is None:
                return None
            info = self._election.leader(self._clock())
            return None if self._stop.is_set() and info is self._election.me else info

    # ------------------------------------------------------------------ lifecycle
    async def start(self, join_address: str, api_address: str) -> None:
        """Start the election thread and wait up to ``initial_wait_s`` for a first view of
        the key (then go on: joins wait for a leader). Idempotent."""
        if self._thread is not None:
            return
        me = LeaderInfo(self.replica_id, self.incarnation, join_address, api_address)
        with self._lock:
            self._election = Election(me, self.ttl_s, retry_s=self.retry_s,
                                      max_backoff_s=self.max_backoff_s)
        log.info("leader election: Consul at %s, key %s, replica %s (session TTL %g s, "
                 "lock-delay %g s)", self.target.url, self.key, self.replica_id, self.ttl_s,
                 self.lock_delay_s)
        self._thread = threading.Thread(target=self._main, daemon=True,
                                        name="leader-election")
        self._thread.start()
        if not await asyncio.to_thread(self._first_view.wait, self.initial_wait_s):
            log.warning("leader election: no answer from Consul at %s within %g s; joins and "
                        "renewals wait for a leader", self.target.url, self.initial_wait_s)

    async def stop(self) -> None:
        """Stop the thread; release the key if held and destroy the session, so another
        replica takes over at once (no lock-delay). Never raises. Idempotent."""
        if self._thread is None or self._stop.is_set():
            return
        self._stop.set()
        with self._lock:
            session = self._election.session if self._election is not None else None
            me = self._election.me if self._election is not None else None
        if session is not None and me is not None:
            await asyncio.to_thread(self._release, session, me)
        await asyncio.to_thread(self._thread.join, 1.0)

    def _release(self, session: str, me: LeaderInfo) -> None:
        with self._lock:
            if session in self._released:
                return
            self._released.add(session)
        client = connect(self.target, self.request_timeout_s)
        try:
            released = client.kv.put(self.key, me.encode(), release=session)
            client.session.destroy(session)
            log.info("leader election: session destroyed%s", " and the leader key released"
                     if released else "")
        except Exception as exc:
            log.warning("leader election: could not release the key and the session (%s); "
                        "Consul drops them after the TTL (%g s)", _short(exc), self.ttl_s)

    # ------------------------------------------------------------------ the thread
    def _main(self) -> None:
        client = connect(self.target, self.request_timeout_s)
        while not self._stop.is_set():
            with self._lock:
                assert self._election is not None
                step = self._election.step(self._clock())
            try:
                self._do(client, step)
            except Exception as exc:  # Consul away or answering errors: back off, retry
                with self._lock:
                    assert self._election is not None
                    self._election.failed(self._clock(), renew_next=step.kind == ACQUIRE)
                if is_outage(exc) and not self._unreachable:
                    self._unreachable = True
                    log.warning("leader election: Consul at %s cannot be used (%s); retrying",
                                self.target.url, _short(exc))
                elif not is_outage(exc):
                    log.warning("leader election: %s failed: %s", step.kind, _short(exc))
            self._report()
        # A session made while stopping (stop() could not know it) goes too.
        with self._lock:
            session = self._election.session if self._election is not None else None
            me = self._election.me if self._election is not None else None
        if session is not None and me is not None:
            self._release(session, me)

    def _do(self, client: Any, step: Step) -> None:
        e = self._election
        assert e is not None
        if step.kind == PAUSE:
            self._stop.wait(step.wait_s)
            return
        sent = self._clock()
        if step.kind == CREATE_SESSION:
            sid = client.session.create(name=f"mesh control plane {self.replica_id}",
                                        behavior="release", ttl=math.ceil(self.ttl_s),
                                        lock_delay=_lock_delay_arg(self.lock_delay_s))
            with self._lock:
                e.session_created(sid, sent)
            self._reachable()
        elif step.kind == RENEW:
            assert e.session is not None
            try:
                client.session.renew(e.session)
            except NotFound:
                log.warning("leader election: session %s is gone (Consul invalidated it)%s",
                            e.session, "; this replica no longer leads"
                            if self.is_leader() else "")
                with self._lock:
                    e.session_gone()
                return
            with self._lock:
                e.renewed(sent)
            self._reachable()
        elif step.kind == ACQUIRE:
            assert e.session is not None
            me = LeaderInfo(e.me.replica, e.me.incarnation, e.me.join_address,
                            e.me.api_address, self._wall())
            ok = bool(client.kv.put(self.key, me.encode(), acquire=e.session))
            with self._lock:
                if ok:
                    e.me = me
                e.acquired(ok, self._clock())
            self._reachable()
            if ok:
                self._first_view.set()
        else:  # WATCH
            entry, _ = blocking_get(
                lambda index, wait: client.kv.get(self.key, index=index, wait=wait),
                e.index, step.wait_s)
            with self._lock:
                e.observed_entry(entry)
            self._reachable()
            self._first_view.set()
            self._stop.wait(MIN_QUERY_INTERVAL_S)

    def _reachable(self) -> None:
        if self._unreachable:
            self._unreachable = False
            log.info("leader election: Consul at %s answers again", self.target.url)

    def _report(self) -> None:
        """Log a change of who leads (at most once per step of the thread)."""
        leading = self.is_leader()
        leader = self.leader()
        now = (leading, leader.replica if leader else "")
        if now == self._reported:
            return
        self._reported = now
        self.changes += 1
        if leading:
            log.warning("this replica (%s) is the leader now: it signs every certificate",
                        self.replica_id)
        elif leader is not None:
            log.warning("replica %s is the leader (join %s, API %s); this replica forwards "
                        "joins and renewals to it", leader.replica, leader.join_address,
                        leader.api_address)
        else:
            log.warning("no leader known: joins and renewals are refused (UNAVAILABLE) until "
                        "one is elected")


def _lock_delay_arg(seconds: float) -> int | float:
    """py-consul formats ``lock_delay`` as ``f"{value}s"`` (and sends nothing for 15)."""
    return int(seconds) if seconds == int(seconds) else seconds


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


# ---------------------------------------------------------------------- metrics
class LeaderMetrics:
    """``mesh_cp_leader`` (1 while this replica leads, read at scrape time from
    ``is_leader``) and ``mesh_cp_forwarded_total{rpc,outcome}`` (joins and renewals this
    replica forwarded: ``FORWARD_RPCS`` x ``FORWARD_OUTCOMES``, all present from 0), on the
    control plane's ``registry``."""

    def __init__(self, registry: CollectorRegistry, is_leader: Callable[[], bool]) -> None:
        gauge = Gauge("mesh_cp_leader", "1 while this control-plane replica is the leader "
                      "(signs every certificate), else 0.", registry=registry)
        gauge.set_function(lambda: 1.0 if is_leader() else 0.0)
        counter = Counter("mesh_cp_forwarded", "Joins and renewals this replica forwarded "
                          "to the leader, by RPC and outcome (ok, refused by the leader, "
                          "unavailable: no leader known or it could not be reached).",
                          labelnames=["rpc", "outcome"], registry=registry)
        self._forwarded = {(r, o): counter.labels(rpc=r, outcome=o)
                           for r in FORWARD_RPCS for o in FORWARD_OUTCOMES}

    def forwarded(self, rpc: str, outcome: str) -> None:
        """Count one forwarded call (ValueError for an unknown label)."""
        child = self._forwarded.get((rpc, outcome))
        if child is None:
            raise ValueError(f"unknown forwarding label {rpc}/{outcome}")
        child.inc()


# ---------------------------------------------------------------------- forwarding
@dataclass
class _ApiChannel:
    address: str
    channel: grpc.aio.Channel
    made_at: float


class Forwarder:
    """A follower's relaying of joins and renewals to the leader (see the module docstring).

    ``leadership()`` gives the current ``Leadership``; ``ca()`` the CA this replica holds (for
    its replica certificate); ``now()`` the time certificates are issued at. One channel to
    the leader's join listener and one (mTLS) to its API listener are kept, made again when
    the leader changes."""

    def __init__(self, leadership: Callable[[], Leadership],
                 ca: Callable[[], CertificateAuthority], now: Callable[[], dt.datetime],
                 metrics: LeaderMetrics, *, timeout_s: float = FORWARD_TIMEOUT_S) -> None:
        self._leadership = leadership
        self._ca = ca
        self._now = now
        self.metrics = metrics
        self.timeout_s = timeout_s
        self._join: tuple[str, grpc.aio.Channel] | None = None
        self._api: _ApiChannel | None = None

    async def _refuse(self, context: grpc.aio.ServicerContext, rpc: str, outcome: str,
                      code: grpc.StatusCode, message: str) -> NoReturn:
        self.metrics.forwarded(rpc, outcome)
        await context.abort(code, message)
        raise AssertionError("unreachable")  # abort raises

    async def _leader_for(self, context: grpc.aio.ServicerContext, rpc: str) -> LeaderInfo:
        """The leader to forward to; aborts UNAVAILABLE when none is known, when the leader
        known is this replica (it lost the lead meanwhile), or when the call was already
        forwarded once."""
        leadership = self._leadership()
        forwarded_by = next((v for k, v in (context.invocation_metadata() or ())
                             if k == FORWARDED_METADATA), None)
        if forwarded_by is not None:
            await self._refuse(context, rpc, "unavailable", grpc.StatusCode.UNAVAILABLE,
                               f"replica {leadership.replica_id} is not the leader (forwarded "
                               f"by {str(forwarded_by)[:128]}): try again")
        leader = leadership.leader()
        if leader is None or leader.replica == leadership.replica_id:
            await self._refuse(context, rpc, "unavailable", grpc.StatusCode.UNAVAILABLE,
                               NO_LEADER)
        return leader

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.timeout_s if remaining is None else max(0.05, min(self.timeout_s,
                                                                      remaining))

    async def join(self, request: pb.JoinRequest,
                   context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        """Relay a Join unchanged to the leader's join listener; its answer, with its
        trailing metadata (the answer's MAC), or its status and details, as they are.
        UNAVAILABLE when no leader is known or it cannot be reached."""
        leader = await self._leader_for(context, "join")
        channel = self._join_channel(leader.join_address)
        call = pb_grpc.BootstrapStub(channel).Join(
            request, timeout=self._timeout(context),
            metadata=((FORWARDED_METADATA, self._leadership().replica_id),))
        try:
            response = await call
            trailers = await call.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            await self._relay_error(context, "join", leader, exc)
        context.set_trailing_metadata(tuple((k, v) for k, v in (trailers or ())))
        self.metrics.forwarded("join", "ok")
        log.info("forwarded a join (token %s) to the leader %s", request.token_id[:64],
                 leader.replica)
        return response

    async def renew(self, request: pb.RenewRequest, service: str,
                    context: grpc.aio.ServicerContext) -> pb.RenewResponse:
        """Have the leader sign a renewal this replica authenticated (``service``: the
        caller's, from its certificate) through ``Replica/Sign``; the answer as a
        RenewResponse, or the leader's status and details. UNAVAILABLE when no leader is
        known or it cannot be reached."""
        leader = await self._leader_for(context, "renew")
        channel = self._api_channel(leader.api_address)
        try:
            signed = await pb_grpc.ReplicaStub(channel).Sign(
                pb.SignRequest(csr=request.csr, service=service,
                               instance_id=request.instance_id),
                timeout=self._timeout(context),
                metadata=((FORWARDED_METADATA, self._leadership().replica_id),))
        except grpc.aio.AioRpcError as exc:
            await self._relay_error(context, "renew", leader, exc)
        self.metrics.forwarded("renew", "ok")
        log.info("the leader %s signed the renewal of %s instance %s", leader.replica, service,
                 request.instance_id or "-")
        return pb.RenewResponse(certificate_pem=signed.certificate_pem,
                                trust_bundle_pem=signed.trust_bundle_pem,
                                spiffe_id=signed.spiffe_id)

    async def _relay_error(self, context: grpc.aio.ServicerContext, rpc: str,
                           leader: LeaderInfo, exc: grpc.aio.AioRpcError) -> NoReturn:
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            log.warning("forwarding a %s to the leader %s failed: %s: %s", rpc, leader.replica,
                        code.name, exc.details())
            await self._refuse(context, rpc, "unavailable", code,
                               f"the leader (replica {leader.replica}) cannot be reached: "
                               f"{exc.details()}")
        await self._refuse(context, rpc, "refused", code, exc.details() or code.name)

    def _join_channel(self, address: str) -> grpc.aio.Channel:
        if self._join is not None and self._join[0] == address:
            return self._join[1]
        self._drop(self._join[1] if self._join else None)
        channel = grpc.aio.insecure_channel(address)
        self._join = (address, channel)
        return channel

    def _api_channel(self, address: str) -> grpc.aio.Channel:
        now = time.monotonic()
        held = self._api
        if held is not None and held.address == address and \
                now - held.made_at < REPLICA_CERT_REFRESH_S:
            return held.channel
        self._drop(held.channel if held else None)
        ca = self._ca()
        rid = self._leadership().replica_id
        issued, key_pem = ca.issue_keypair(replica_spiffe_id(ca.trust_domain, rid),
                                           f"control-plane replica {rid}", self._now(),
                                           REPLICA_CERT_TTL)
        chain = issued.pem
        if ca.cert.issuer != ca.cert.subject:  # an intermediate: its chain goes along
            chain += ca.chain_pem
        creds = grpc.ssl_channel_credentials(root_certificates=ca.bundle_pem,
                                             private_key=key_pem, certificate_chain=chain)
        channel = grpc.aio.secure_channel(address, creds)
        self._api = _ApiChannel(address, channel, now)
        return channel

    @staticmethod
    def _drop(channel: grpc.aio.Channel | None) -> None:
        if channel is not None:
            with contextlib.suppress(RuntimeError):  # no loop any more: nothing to close
                asyncio.get_running_loop().create_task(channel.close())

    async def close(self) -> None:
        """Close the channels to the leader."""
        for channel in (self._join[1] if self._join else None,
                        self._api.channel if self._api else None):
            if channel is not None:
                await channel.close()
        self._join = self._api = None
