"""The StateStore contract (control_plane.state), one suite for every backend.

The ``backend`` fixture runs each test against:

* ``sqlite``: ``control_plane.store.Store``, the default, under the test's tmp dir;
* ``consul_standin``: ``control_plane.kvstore.ConsulStore`` against tests/support/
  consul_standin.py (a test double of Consul's HTTP API, started as a process with an ACL
  token the store must send);
* ``consul_live``: ``ConsulStore`` against a real Consul, only when ``CONSUL_HTTP_ADDR`` is set
  (``consul agent -dev`` and ``CONSUL_HTTP_ADDR=127.0.0.1:8500``; a token in
  ``CONSUL_HTTP_TOKEN`` if ACLs are on).

Every test works under its own Consul prefix (deleted at the end). ``backend.open()`` gives
a new handle on the same state (a restarted control plane, or another replica). Consul-only
tests: two ConsulStore "replicas" racing from threads on token uses, config saves, version
numbers, audit rows and revocations never collide or lose a write; a lost race leaves
nothing half-written; the watch tells a replica what another changed; and two real
``mesh-control-plane --registry consul://...`` processes share tokens, config, the
authorization default and the audit log.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

import control_plane.store as store_mod
from control_plane.config_store import ConfigState, ConfigStore
from control_plane.consul_conn import connect, target_from_env, url_from_http_addr
from control_plane.kvstore import TXN_MAX_OPS, ConsulStore
from control_plane.state import (
    MAX_AUDIT_FIELD_CHARS,
    WATCH_AUTHZ,
    WATCH_CONFIG,
    WATCH_REVOKED,
    AuditRow,
    CertRow,
    DuplicateKey,
    RevokedRow,
    StateError,
    StateStore,
    TokenRow,
    UseResult,
)
from control_plane.store import Store
from mesh_common.config import Document
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from tests.integration.test_control_plane import ControlPlaneProc, admin_channel
from tests.support import procs
from tests.support.sidecar import REPO_ROOT

pytestmark = pytest.mark.timeout(90)

T0 = 1_800_000_000.0
ADMIN = "spiffe://mesh.local/admin/meshctl"
TOKEN = "state-contract-token"
DIGEST = "d" * 64
LIVE_SKIP = ("CONSUL_HTTP_ADDR is not set: no live Consul to test against "
             "(run `consul agent -dev` and set CONSUL_HTTP_ADDR=127.0.0.1:8500)")


# -- backends ------------------------------------------------------------------------------
@dataclass
class StandIn:
    """A Consul stand-in process (``url``: consul://HOST:PORT; requires ``token``)."""

    proc: procs.Proc
    url: str
    token: str = TOKEN


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    proc = procs.start([sys.executable, "-m", "tests.support.consul_standin",
                        "--listen", "127.0.0.1:0", "--acl-token", TOKEN], cwd=REPO_ROOT,
                       log_dir=tmp_path_factory.mktemp("consul-standin"), ready_timeout_s=20)
    yield StandIn(proc, f"consul://{proc.ready}")
    proc.stop()


@dataclass
class Backend:
    """One backend under test; ``open`` makes a new handle on its shared state."""

    id: str
    data_dir: Path
    consul_url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    prefix: str = ""

    @property
    def is_consul(self) -> bool:
        return bool(self.consul_url)

    def open(self, **options: Any) -> StateStore:
        if self.is_consul:
            return self.consul(**options)
        return Store(self.data_dir)

    def consul(self, cls: type[ConsulStore] = ConsulStore, **options: Any) -> ConsulStore:
        assert self.is_consul
        opts: dict[str, Any] = {"watch_wait_s": 2.0, "watch_max_backoff_s": 0.3}
        opts.update(options)
        return cls.from_url(self.consul_url, prefix=self.prefix, env=self.env, **opts)

    def capped(self, rows: int, monkeypatch: pytest.MonkeyPatch) -> StateStore:
        """A handle whose audit log keeps the newest ``rows`` entries."""
        if self.is_consul:
            return self.open(max_audit_rows=rows, audit_bucket_rows=2)
        monkeypatch.setattr(store_mod, "MAX_AUDIT_ROWS", rows)
        return self.open()

    def kv_keys(self) -> list[str]:
        """Every KV key under this backend's prefix."""
        _, keys = connect(target_from_env(self.consul_url, self.env)).kv.get(
            self.prefix + "/", keys=True)
        return list(keys or [])

    def cleanup(self) -> None:
        if self.is_consul:
            connect(target_from_env(self.consul_url, self.env)).kv.delete(
                self.prefix + "/", recurse=True)


def _backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    prefix = f"s{uuid.uuid4().hex[:10]}"
    if kind == "sqlite":
        b = Backend(kind, tmp_path / "data")
    elif kind == "consul_standin":
        s: StandIn = request.getfixturevalue("standin")
        b = Backend(kind, tmp_path / "data", s.url, {"CONSUL_HTTP_TOKEN": s.token}, prefix)
    else:
        addr = os.environ.get("CONSUL_HTTP_ADDR", "")
        if not addr:
            pytest.skip(LIVE_SKIP)
        b = Backend(kind, tmp_path / "data", url_from_http_addr(addr), dict(os.environ), prefix)
    yield b
    b.cleanup()


@pytest.fixture(params=["sqlite", "consul_standin", "consul_live"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backend(request.param, request, tmp_path)


@pytest.fixture(params=["consul_standin", "consul_live"])
def consul_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backend(request.param, request, tmp_path)


def race(workers: list[Callable[[], Any]], timeout_s: float = 60) -> list[Any]:
    """Run every worker on its own thread, released together; their results in order.
    Re-raises the first worker's exception."""
    barrier = threading.Barrier(len(workers))
    results: list[Any] = [None] * len(workers)
    errors: list[BaseException] = []

    def run(i: int, fn: Callable[[], Any]) -> None:
        try:
            barrier.wait(timeout=timeout_s)
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), "a racing worker did not finish"
    if errors:
        raise errors[0]
    return results


# -- tokens --------------------------------------------------------------------------------
def test_tokens_are_added_listed_found_and_deleted(backend: Backend) -> None:
    s = backend.open()
    a = s.add_token("tok-a", "order", DIGEST, T0 + 60, 2, T0 + 1)
    b = s.add_token("tok-b", "payment", DIGEST, T0 + 60, None, T0)
    assert a == TokenRow("tok-a", "order", DIGEST, T0 + 60, 2, T0 + 1)
    with pytest.raises(DuplicateKey):
        s.add_token("tok-a", "other", DIGEST, T0 + 60, 1, T0)
    again = backend.open()   # a restarted control plane, or another replica
    assert again.get_token("tok-a") == a and again.get_token("nope") is None
    assert again.list_tokens() == [b, a]        # by created_at
    assert again.delete_token("tok-a") is True
    assert s.delete_token("tok-a") is False
    assert s.get_token("tok-a") is None and s.list_tokens() == [b]


def test_token_ids_that_look_like_paths_stay_their_own_tokens(backend: Backend) -> None:
    s = backend.open()
    odd = ["../tok", "a/b", "", ".", "tok a", "ü"]
    for i, tid in enumerate(odd):
        s.add_token(tid, f"svc{i}", DIGEST, T0 + 60, 1, T0 + i)
    assert [t.token_id for t in s.list_tokens()] == odd
    assert s.get_token("b") is None and s.get_token("tok") is None
    if backend.is_consul:
        assert all(k.startswith(backend.prefix + "/tokens/") for k in backend.kv_keys())


def test_a_limited_token_is_used_up_and_a_use_can_be_given_back(backend: Backend) -> None:
    s = backend.open()
    s.add_token("two", "order", DIGEST, T0 + 60, 2, T0)
    s.add_token("free", "order", DIGEST, T0 + 60, None, T0)
    result, row = s.use_token("two", T0)
    assert result is UseResult.OK and row is not None and row.uses_left == 1
    assert s.use_token("two", T0)[0] is UseResult.OK
    result, row = s.use_token("two", T0)
    assert result is UseResult.USED_UP and row is not None and row.uses_left == 0
    s.give_back_use("two")
    assert backend.open().get_token("two").uses_left == 1  # type: ignore[union-attr]
    assert s.use_token("two", T0)[0] is UseResult.OK
    for _ in range(3):
        result, row = s.use_token("free", T0)
        assert result is UseResult.OK and row is not None and row.uses_left is None
    s.give_back_use("free")
    s.give_back_use("nope")
    assert s.get_token("free").uses_left is None  # type: ignore[union-attr]
    assert s.use_token("two", T0 + 60)[0] is UseResult.EXPIRED
    assert s.use_token("nope", T0) == (UseResult.UNKNOWN, None)


# -- certificates and revocation -------------------------------------------------------------
def issue(s: StateStore, serial: str, instance: str, issued_at: float, *,
          service: str = "order", ttl: float = 3600, token: str | None = None) -> CertRow:
    spiffe = f"spiffe://mesh.local/service/{service}"
    s.record_certificate(serial, service, instance, spiffe, issued_at + ttl, issued_at, token)
    return CertRow(serial, service, instance, spiffe, issued_at + ttl, issued_at)


def test_certificates_are_recorded_listed_and_found_by_instance(backend: Backend) -> None:
    s = backend.open()
    a1 = issue(s, "a1", "o-1", T0, token="tok-a")
    a2 = issue(s, "a2", "o-1", T0 + 10)
    p1 = issue(s, "p1", "o-1", T0 + 5, service="payment")
    old = issue(s, "b0", "o-1", T0 - 7200)             # expired by T0
    d1 = issue(s, "d1", "-", T0 + 1)
    other = backend.open()
    assert other.list_certificates() == [old, a1, d1, p1, a2]
    assert other.get_certificate("a2") == a2 and other.get_certificate("zz") is None
    assert other.certificates_of_instance("o-1", T0 + 20) == [a1, p1, a2]
    assert other.certificates_of_instance("o-1", T0 + 20, "order") == [a1, a2]
    assert other.certificates_of_instance("o-9", T0) == []
    moved = issue(s, "a1", "o-2", T0 + 30)              # the same serial again: replaced
    assert other.get_certificate("a1") == moved
    assert other.certificates_of_instance("o-1", T0 + 20, "order") == [a2]
    assert other.certificates_of_instance("o-2", T0 + 20) == [moved]


def test_revocations_are_recorded_once_and_bar_only_the_latest_certificate(
        backend: Backend) -> None:
    s = backend.open()
    a1 = issue(s, "a1", "o-1", T0)
    issue(s, "a2", "o-1", T0 + 100)
    b1 = issue(s, "b1", "o-2", T0)
    issue(s, "c1", "-", T0)
    assert s.revoke(["a1", "ffff", "a1"], T0 + 5, ADMIN) == ["a1"]   # unknown: left out
    assert s.revoke(["a1", "b1"], T0 + 6, ADMIN) == ["b1"]            # a1 already
    other = backend.open()
    assert other.list_revoked() == [
        RevokedRow("a1", T0 + 5, ADMIN, "order", "o-1", a1.not_after),
        RevokedRow("b1", T0 + 6, ADMIN, "order", "o-2", b1.not_after)]
    assert other.barred_instances() == {("order", "o-2")}   # a1 was superseded by a2
    assert s.revoke(["c1"], T0 + 7, ADMIN) == ["c1"]
    assert other.barred_instances() == {("order", "o-2")}   # "-" is never barred
    assert s.revoke(["a2"], T0 + 8, ADMIN) == ["a2"]
    assert other.barred_instances() == {("order", "o-1"), ("order", "o-2")}
    assert s.revoke([], T0, ADMIN) == []


# -- audit log -----------------------------------------------------------------------------
def test_audit_rows_come_back_newest_first_filtered_and_limited(backend: Backend) -> None:
    s = backend.open()
    for i, action in enumerate(["apply", "token.create", "apply", "certs.revoke"]):
        s.add_audit(AuditRow(T0 + i, ADMIN, action, f"obj-{i}", "ok"))
    rows = backend.open().list_audit(10)
    assert [r.object for r in rows] == ["obj-3", "obj-2", "obj-1", "obj-0"]
    assert rows[0] == AuditRow(T0 + 3, ADMIN, "certs.revoke", "obj-3", "ok")
    assert [r.object for r in s.list_audit(10, "apply")] == ["obj-2", "obj-0"]
    assert [r.object for r in s.list_audit(1)] == ["obj-3"]
    assert s.list_audit(10, "delete") == [] and s.list_audit(0) == []


def test_the_audit_log_keeps_the_newest_rows_with_fields_cut(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    s = backend.capped(3, monkeypatch)
    for i in range(7):
        s.add_audit(AuditRow(T0 + i, ADMIN, "apply", f"o{i}", "x" * 5000))
    rows = s.list_audit(100)
    assert [r.object for r in rows] == ["o6", "o5", "o4"]
    assert len(rows[0].result) == MAX_AUDIT_FIELD_CHARS
    assert [r.object for r in s.list_audit(100, "apply")] == ["o6", "o5", "o4"]


# -- snapshot versions and the authorization default ---------------------------------------
def test_snapshot_versions_count_up_and_an_unchanged_hash_keeps_its_version(
        backend: Backend) -> None:
    s = backend.open()
    assert s.published_snapshot() == (0, "")
    assert s.publish_snapshot("h1") == 1
    assert s.publish_snapshot("h1") == 1
    assert s.publish_snapshot("h1", force=True) == 2
    assert s.publish_snapshot("h2") == 3
    assert s.take_version_number() == 4
    assert s.published_snapshot() == (3, "h2")
    other = backend.open()
    assert other.publish_snapshot("h2") == 3      # the same content: the same version
    assert other.publish_snapshot("h3") == 5      # never 4 again
    assert s.published_snapshot() == (5, "h3")


def test_the_authorization_default_is_allow_until_set(backend: Backend) -> None:
    s = backend.open()
    assert s.authz_default() == "allow"
    s.set_authz_default("deny")
    assert backend.open().authz_default() == "deny"
    with pytest.raises(ValueError, match="allow or deny"):
        s.set_authz_default("block")
    assert s.authz_default() == "deny"
    s.set_authz_default("allow")
    assert backend.open().authz_default() == "allow"


# -- config revisions ----------------------------------------------------------------------
def test_config_revisions_are_numbered_per_object_and_kept(backend: Backend) -> None:
    s = backend.open()
    assert s.config_latest() == [] and s.config_revisions("Route", "r1") == []
    assert s.config_save([("Route", "r1", {"v": 1}, False),
                          ("TrafficPolicy", "p1", {"lb": "rr"}, False)], T0) == [1, 1]
    assert s.config_save([("Route", "r1", {"v": 2}, False)], T0 + 1) == [2]
    assert s.config_save([("Route", "r1", {"v": 2}, True),
                          ("Route", "r2", {"v": 9}, False),
                          ("Route", "r2", {"v": 10}, False)], T0 + 2) == [3, 1, 2]
    assert s.config_save([], T0) == []
    other = backend.open()
    assert [(r.kind, r.name, r.revision, r.spec, r.applied_at, r.deleted)
            for r in other.config_latest()] == [
        ("Route", "r1", 3, {"v": 2}, T0 + 2, True),
        ("Route", "r2", 2, {"v": 10}, T0 + 2, False),
        ("TrafficPolicy", "p1", 1, {"lb": "rr"}, T0, False)]
    first = other.config_get("Route", "r1", 1)
    assert first is not None and (first.spec, first.applied_at, first.deleted) == (
        {"v": 1}, T0, False)
    assert first.doc() == {"kind": "Route", "name": "r1", "spec": {"v": 1}}
    assert other.config_get("Route", "r1", 4) is None
    assert other.config_get("Route", "nope", 1) is None
    assert other.config_revisions("Route", "r1") == [1, 2, 3]


def test_a_config_save_that_fails_stores_nothing(backend: Backend) -> None:
    s = backend.open()
    s.config_save([("Route", "r1", {"v": 1}, False)], T0)
    with pytest.raises(TypeError):   # the second change cannot be stored
        s.config_save([("Route", "r1", {"v": 2}, False),
                       ("Route", "r2", {"bad": object()}, False)], T0 + 1)
    assert s.config_revisions("Route", "r1") == [1] and s.config_revisions("Route", "r2") == []
    assert [(r.name, r.revision) for r in s.config_latest()] == [("r1", 1)]


def test_config_state_applies_and_reloads_through_the_store(backend: Backend) -> None:
    def docs(lb: str) -> list[Document]:
        return [Document("p.yaml", 1, {"kind": "TrafficPolicy", "name": "audited",
                                       "spec": {"service": "audited", "load_balancer": lb}})]
    state = ConfigState(ConfigStore(backend.open()))
    assert state.load() == []
    done = state.apply(state.plan(docs("round_robin")), T0)
    assert [(o.action, o.revision) for o in done] == [("created", 1)]
    done = state.apply(state.plan(docs("least_request")), T0 + 1)
    assert [(o.action, o.revision) for o in done] == [("configured", 2)]
    replica = ConfigState(ConfigStore(backend.open()))
    loaded = replica.fetch()
    assert replica.objects() == ()                       # fetch alone changes nothing
    assert replica.install(loaded) == []
    assert [(c.obj.name, c.revision) for c in replica.current()] == [("audited", 2)]
    assert replica.revision("TrafficPolicy", "audited", 1).spec["load_balancer"] == \
        "round_robin"


# -- Consul only: replicas racing ----------------------------------------------------------
def test_a_one_use_token_used_by_replicas_at_once_is_spent_exactly_once(
        consul_backend: Backend) -> None:
    a, b = consul_backend.consul(), consul_backend.consul()
    for round_ in range(3):
        a.add_token(f"once-{round_}", "order", DIGEST, T0 + 60, 1, T0)
        results = race([lambda s=s, t=f"once-{round_}": s.use_token(t, T0)[0]
                        for s in (a, b, a, b, a, b)])
        assert sorted(r.value for r in results) == ["ok"] + ["used up"] * 5, results
        assert b.get_token(f"once-{round_}").uses_left == 0  # type: ignore[union-attr]
    a.add_token("three", "order", DIGEST, T0 + 60, 3, T0)
    results = race([lambda s=s: s.use_token("three", T0)[0] for s in (a, b) * 4])
    assert results.count(UseResult.OK) == 3 and results.count(UseResult.USED_UP) == 5


def test_replicas_saving_config_at_once_get_distinct_revisions_and_lose_nothing(
        consul_backend: Backend) -> None:
    a, b = consul_backend.consul(), consul_backend.consul()
    per_worker = 4

    def saver(s: ConsulStore, w: int) -> list[int]:
        return [s.config_save([("Route", "shared", {"writer": w, "i": i}, False),
                               ("Route", f"own-{w}", {"i": i}, False)], T0 + i)[0]
                for i in range(per_worker)]

    results = race([lambda s=s, w=w: saver(s, w) for w, s in enumerate((a, b) * 3)])
    revisions = [r for rs in results for r in rs]
    assert sorted(revisions) == list(range(1, 6 * per_worker + 1))   # none twice, no gap
    assert a.config_revisions("Route", "shared") == sorted(revisions)
    for w, rs in enumerate(results):   # every save kept what its writer wrote
        for i, r in enumerate(rs):
            got = b.config_get("Route", "shared", r)
            assert got is not None and got.spec == {"writer": w, "i": i}
        assert b.config_revisions("Route", f"own-{w}") == list(range(1, per_worker + 1))


def test_a_save_that_lost_a_race_left_nothing_and_was_retried_whole(
        consul_backend: Backend) -> None:
    class StaleOnce(ConsulStore):
        """Reads r2's revisions as they were before another replica wrote one (once)."""

        stale = True

        def config_revisions(self, kind: str, name: str) -> list[int]:
            if name == "r2" and self.stale:
                self.stale = False
                return []
            return super().config_revisions(kind, name)

    other = consul_backend.consul()
    other.config_save([("Route", "r1", {"v": 1}, False), ("Route", "r2", {"v": 1}, False)], T0)
    s = consul_backend.consul(StaleOnce)
    assert s.config_save([("Route", "r1", {"v": 2}, False),
                          ("Route", "r2", {"v": 2}, False)], T0 + 1) == [2, 2]
    assert s.conflicts == 1
    assert other.config_revisions("Route", "r1") == [1, 2]   # the failed try wrote no r1
    assert other.config_get("Route", "r2", 1).spec == {"v": 1}  # type: ignore[union-attr]


def test_an_apply_larger_than_one_transaction_is_refused_whole(consul_backend: Backend) -> None:
    s = consul_backend.consul()
    changes = [("Route", f"r{i}", {"i": i}, False) for i in range(TXN_MAX_OPS + 1)]
    with pytest.raises(StateError, match="at most 64 objects"):
        s.config_save(changes, T0)
    assert s.config_latest() == []
    assert s.config_save(changes[:TXN_MAX_OPS], T0) == [1] * TXN_MAX_OPS


def test_replicas_numbering_snapshots_at_once_never_repeat_a_version(
        consul_backend: Backend) -> None:
    a, b = consul_backend.consul(), consul_backend.consul()

    def worker(s: ConsulStore, w: int) -> list[int]:
        out = []
        for i in range(6):
            out.append(s.take_version_number() if i % 3 == 0
                       else s.publish_snapshot(f"h-{w}-{i}"))
        return out

    results = race([lambda s=s, w=w: worker(s, w) for w, s in enumerate((a, b) * 3)])
    numbers = [n for ns in results for n in ns]
    assert sorted(numbers) == list(range(1, len(numbers) + 1))
    for ns in results:
        assert ns == sorted(ns)        # monotonic for every caller
    assert a.published_snapshot()[0] <= len(numbers)


def test_replicas_writing_audit_rows_and_revoking_at_once_lose_nothing(
        consul_backend: Backend) -> None:
    a, b = consul_backend.consul(), consul_backend.consul()
    race([lambda s=s, w=w: [s.add_audit(AuditRow(T0, ADMIN, "apply", f"w{w}-{i}", "ok"))
                            for i in range(5)] for w, s in enumerate((a, b) * 2)])
    objects = [r.object for r in b.list_audit(100)]
    assert sorted(objects) == sorted(f"w{w}-{i}" for w in range(4) for i in range(5))
    issue(a, "ee", "o-1", T0)
    done = race([lambda s=s: s.revoke(["ee"], T0, ADMIN) for s in (a, b, a, b)])
    assert sorted(done) == [[], [], [], ["ee"]]
    assert [r.serial for r in b.list_revoked()] == ["ee"]


def test_old_audit_buckets_are_deleted_from_consul(consul_backend: Backend) -> None:
    s = consul_backend.consul(max_audit_rows=4, audit_bucket_rows=2)
    for i in range(12):
        s.add_audit(AuditRow(T0 + i, ADMIN, "apply", f"o{i}", "ok"))
    assert [r.object for r in s.list_audit(100)] == ["o11", "o10", "o9", "o8"]
    rows = [k for k in consul_backend.kv_keys() if "/audit/rows/" in k]
    assert 4 <= len(rows) <= 5, rows   # the newest 4, and one more while its bucket fills


def test_the_watch_tells_a_replica_what_another_changed(consul_backend: Backend) -> None:
    writer, watcher = consul_backend.consul(), consul_backend.consul()
    heard: list[str] = []
    lock = threading.Lock()

    def on_change(topic: str) -> None:
        with lock:
            heard.append(topic)

    def heard_now() -> list[str]:
        with lock:
            return list(heard)

    stop = watcher.watch(on_change)
    try:
        procs.wait_for(lambda: set(heard_now()) == {WATCH_CONFIG, WATCH_AUTHZ, WATCH_REVOKED},
                       10, what="the first answer of every watch")
        for topic, change in ((WATCH_CONFIG, lambda: writer.config_save(
                                  [("Route", "r1", {"v": 1}, False)], T0)),
                              (WATCH_AUTHZ, lambda: writer.set_authz_default("deny")),
                              (WATCH_REVOKED, lambda: (issue(writer, "f1", "o-1", T0),
                                                       writer.revoke(["f1"], T0, ADMIN)))):
            before = heard_now().count(topic)
            writer.add_audit(AuditRow(T0, ADMIN, "noise", "x", "ok"))  # wakes no watch
            change()
            procs.wait_for(lambda t=topic, n=before: heard_now().count(t) > n, 10,
                           what=f"the {topic} watch to fire")
        counts = {t: heard_now().count(t) for t in (WATCH_CONFIG, WATCH_AUTHZ, WATCH_REVOKED)}
        writer.add_audit(AuditRow(T0, ADMIN, "noise", "y", "ok"))
        writer.record_certificate("g1", "order", "o-1", "s", T0, T0)
        time.sleep(0.5)  # nothing may come: give a wrongly woken watch the time to say so
        assert {t: heard_now().count(t) for t in counts} == counts
    finally:
        stop()


def test_an_unreachable_consul_is_one_clear_error(tmp_path: Path) -> None:
    port = procs.free_port()
    s = ConsulStore.from_url(f"consul://127.0.0.1:{port}", prefix="x", env={},
                             request_timeout_s=2)
    for call in (lambda: s.get_token("t"), lambda: s.use_token("t", T0),
                 lambda: s.config_save([("Route", "r", {}, False)], T0)):
        with pytest.raises(StateError, match=rf"Consul at consul://127.0.0.1:{port} is "
                                             r"unavailable") as err:
            call()
        assert "\n" not in str(err.value)


# -- Consul only: two control planes sharing the state ----------------------------------------
def start_cp_on(standin: StandIn, base: Path, prefix: str) -> ControlPlaneProc:
    ca_dir, data_dir = base / "ca", base / "data"
    base.mkdir(parents=True, exist_ok=True)
    proc = procs.start([sys.executable, "-m", "control_plane.main", "--listen", "127.0.0.1:0",
                        "--bootstrap-listen", "127.0.0.1:0", "--ca-dir", str(ca_dir),
                        "--data-dir", str(data_dir), "--admin-http", "127.0.0.1:0",
                        "--otlp-listen", "", "--registry", standin.url,
                        "--consul-prefix", prefix],
                       env={"CONSUL_HTTP_TOKEN": standin.token}, cwd=REPO_ROOT, log_dir=base)
    return ControlPlaneProc(proc, ca_dir, data_dir)


def test_two_control_planes_on_consul_share_tokens_config_authz_and_audit(
        standin: StandIn, tmp_path: Path) -> None:
    prefix = f"cp{uuid.uuid4().hex[:8]}"
    a = start_cp_on(standin, tmp_path / "a", prefix)
    b = start_cp_on(standin, tmp_path / "b", prefix)
    try:
        with admin_channel(a) as cha, admin_channel(b) as chb:
            admin_a, admin_b = pb_grpc.AdminStub(cha), pb_grpc.AdminStub(chb)
            made = admin_a.CreateToken(pb.CreateTokenRequest(service="order", uses=1),
                                       timeout=10)
            assert made.token_id in {t.token_id for t in admin_b.ListTokens(
                pb.ListTokensRequest(), timeout=10).tokens}
            # the tokens are in Consul, not in the replica's own SQLite file
            assert Store(a.data_dir).list_tokens() == []

            doc = pb.ConfigDocument(source="p.yaml", index=1, json=json.dumps(
                {"kind": "TrafficPolicy", "name": "shared",
                 "spec": {"service": "shared", "load_balancer": "round_robin"}}))
            applied = admin_a.ApplyConfig(pb.ApplyConfigRequest(documents=[doc]), timeout=10)
            assert [r.revision for r in applied.results] == [1]

            def b_has_it() -> bool:
                got = admin_b.GetConfig(pb.GetConfigRequest(kind="TrafficPolicy"), timeout=10)
                return [(o.name, o.revision) for o in got.objects] == [("shared", 1)]
            procs.wait_for(b_has_it, 15, what="replica b to load a's config")
            # b published the same content: the shared counter gives it a's version
            procs.wait_for(lambda: admin_b.ListSidecars(pb.ListSidecarsRequest(), timeout=10)
                           .latest_version == applied.version, 15,
                           what="replica b to publish a's version")

            # b changes it next: its revision follows a's (one counter per object)
            doc2 = pb.ConfigDocument(source="p.yaml", index=1, json=json.dumps(
                {"kind": "TrafficPolicy", "name": "shared",
                 "spec": {"service": "shared", "load_balancer": "least_request"}}))
            again = admin_b.ApplyConfig(pb.ApplyConfigRequest(documents=[doc2]), timeout=10)
            assert [r.revision for r in again.results] == [2]
            assert int(again.version) > int(applied.version)

            admin_a.SetAuthzDefault(pb.SetAuthzDefaultRequest(action="deny"), timeout=10)
            procs.wait_for(lambda: admin_b.GetAuthzDefault(pb.GetAuthzDefaultRequest(),
                                                           timeout=10).action == "deny",
                           15, what="replica b to take a's authorization default")

            entries = admin_b.ListAudit(pb.ListAuditRequest(limit=50), timeout=10).entries
            actions = [(e.action, e.identity) for e in entries]
            assert ("token.create", "spiffe://mesh.local/admin/meshctl") in actions
            assert [e.action for e in entries].count("apply") == 2   # a's and b's
            assert "authz.default" in [e.action for e in entries]
            with pytest.raises(grpc.RpcError) as err:
                admin_b.DeleteToken(pb.DeleteTokenRequest(token_id="never"), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
            admin_b.DeleteToken(pb.DeleteTokenRequest(token_id=made.token_id), timeout=10)
            assert len(admin_a.ListTokens(pb.ListTokensRequest(), timeout=10).tokens) == 0
    finally:
        for cp in (a, b):
            assert cp.proc.stop() == 0, cp.proc.log_tail()
        connect(target_from_env(standin.url, {"CONSUL_HTTP_TOKEN": standin.token})).kv.delete(
            prefix + "/", recurse=True)
