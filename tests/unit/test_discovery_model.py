"""The control plane's discovery model without a network: the snapshot built from the registry,
versions and their coalesced publishing, the embedded registry's grace period (also across a
restart, on a real SQLite store), telemetry's rates and percentiles, and the sync states.

Every time is an explicit ``now`` (unix seconds); nothing sleeps. The suite's default timeout
(pyproject) applies.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane.discovery import (
    NACKED,
    STALE,
    SYNCED,
    SYNCING,
    Publisher,
    QueryFailed,
    Session,
    SessionHub,
    build_snapshot,
    raw_published,
    sync_state,
)
from control_plane.registry import (
    NOT_SERVING,
    SERVING,
    UNKNOWN,
    UNREACHABLE,
    Instance,
    expired,
    sort_labels,
)
from control_plane.registry.embedded import EmbeddedRegistry
from control_plane.store import Store
from control_plane.telemetry import (
    Histogram,
    Report,
    Telemetry,
    UpstreamSample,
    merge_histograms,
    percentile_ms,
)
from mesh_common.snapshot import content_hash, from_doc, from_json
from protos.mesh.v1 import control_pb2 as pb

FAST = settings(deadline=None, max_examples=60)
TD = "mesh.local"
T0 = 1_800_000_000.0
GRACE_S = 10.0


def inst(service: str, iid: str, port: int | None = 20000, health: str = SERVING,
         labels: dict[str, str] | None = None, connected: bool = True,
         registered_at: float = T0) -> Instance:
    return Instance(service, iid, f"spiffe://{TD}/service/{service}",
                    inbound=f"127.0.0.1:{port}" if port else "", outbound="127.0.0.1:15001",
                    admin="127.0.0.1:15000", labels=sort_labels(labels or {}), health=health,
                    connected=connected, disconnected_at=None if connected else T0,
                    registered_at=registered_at)


# ---------------------------------------------------------------------- the snapshot
def test_one_cluster_per_service_with_endpoints_sorted_by_instance_and_identity_routes() -> None:
    snap = build_snapshot([inst("payment", "p-2", 20002), inst("order", "o-1", 20010),
                           inst("payment", "p-1", 20001, labels={"version": "v2"})], "7")
    assert snap.version == "7"
    assert [c.name for c in snap.clusters] == ["order", "payment"]
    payment = snap.cluster("payment")
    assert payment is not None
    assert [(e.instance, e.address) for e in payment.endpoints] == [
        ("p-1", "127.0.0.1:20001"), ("p-2", "127.0.0.1:20002")]
    assert payment.endpoints[0].labels == (("version", "v2"),)
    assert payment.endpoints[0].spiffe_id == f"spiffe://{TD}/service/payment"
    assert [(r.service, r.cluster) for r in snap.routes] == [("order", "order"),
                                                             ("payment", "payment")]


@pytest.mark.parametrize(("health", "healthy"), [
    (SERVING, True), (NOT_SERVING, False), (UNREACHABLE, False), (UNKNOWN, False), ("", False)])
def test_only_an_app_that_reports_serving_is_a_healthy_endpoint(health: str,
                                                                 healthy: bool) -> None:
    snap = build_snapshot([inst("payment", "p-1", health=health)], "1")
    cluster = snap.cluster("payment")
    assert cluster is not None and [e.healthy for e in cluster.endpoints] == [healthy]
    assert len(cluster.healthy) == (1 if healthy else 0)


def test_outbound_only_instances_make_no_cluster() -> None:
    snap = build_snapshot([inst("gateway", "g-1", port=None), inst("order", "o-1")], "1")
    assert [c.name for c in snap.clusters] == ["order"]
    assert snap.cluster("gateway") is None


def test_a_disconnected_instance_stays_an_endpoint_until_pruned() -> None:
    snap = build_snapshot([inst("payment", "p-1", connected=False)], "1")
    assert snap.cluster("payment") is not None


def test_two_instances_on_one_address_keep_the_connected_one() -> None:
    old = inst("payment", "p-old", 20001, connected=False, registered_at=T0)
    new = inst("payment", "p-new", 20001, registered_at=T0 + 5)
    for order in ([old, new], [new, old]):
        cluster = build_snapshot(order, "1").cluster("payment")
        assert cluster is not None and [e.instance for e in cluster.endpoints] == ["p-new"]


_services = st.sampled_from(["order", "payment", "inventory", "gateway"])
_instances = st.lists(
    st.builds(inst, service=_services, iid=st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
              port=st.one_of(st.none(), st.integers(1, 65535)),
              health=st.sampled_from([SERVING, NOT_SERVING, UNKNOWN, UNREACHABLE, ""]),
              labels=st.dictionaries(st.sampled_from(["version", "zone"]),
                                     st.sampled_from(["v1", "v2", "a"]), max_size=2),
              connected=st.booleans(), registered_at=st.floats(T0, T0 + 100)),
    max_size=12, unique_by=lambda i: i.key)


@FAST
@given(instances=_instances, data=st.data())
def test_the_built_snapshot_always_validates_and_its_hash_ignores_order(
        instances: list[Instance], data: st.DataObject) -> None:
    snap = build_snapshot(instances, "3")
    doc = snap.to_doc()
    assert from_doc(doc, TD).to_doc() == doc  # what every sidecar will check
    shuffled = data.draw(st.permutations(instances))
    assert build_snapshot(shuffled, "4").content_hash() == snap.content_hash()
    with_inbound = {i.service for i in instances if i.inbound}
    assert {c.name for c in snap.clusters} == with_inbound
    for c in snap.clusters:
        assert list(c.endpoints) == sorted(c.endpoints, key=lambda e: (e.instance, e.address))


# ---------------------------------------------------------------------- versions
async def test_an_unchanged_content_hash_publishes_nothing_and_keeps_the_version(
        tmp_path: Path) -> None:
    reg = EmbeddedRegistry(GRACE_S)
    pub = Publisher(reg, Store(tmp_path), push_window_s=0.1, trust_domain=TD)
    seen: list[str] = []
    pub.subscribe(lambda p: seen.append(p.version))
    first = await pub.publish_now()
    reg.register(inst("payment", "p-1"), T0)
    second = await pub.publish_now()
    reg.disconnected("payment", "p-1", T0 + 1)  # no content change
    reg.register(inst("payment", "p-1"), T0 + 2)
    third = await pub.publish_now()
    assert (first.version, second.version, third.version) == ("1", "2", "2")
    assert seen == ["1", "2"]
    assert json.loads(second.json)["version"] == "2"
    assert from_json(second.json, TD).content_hash() == second.hash


async def test_versions_stay_monotonic_across_a_restart(tmp_path: Path) -> None:
    store = Store(tmp_path)
    reg = EmbeddedRegistry(GRACE_S, store)
    reg.register(inst("payment", "p-1"), T0)
    before = await Publisher(reg, store, 0.1, TD).publish_now()
    assert store.take_version_number() == int(before.version) + 1  # a test hook took one
    await reg.flush()

    restarted = EmbeddedRegistry.load(Store(tmp_path), GRACE_S, T0 + 100)
    same = await Publisher(restarted, store, 0.1, TD).publish_now()
    assert (same.version, same.hash) == (before.version, before.hash)  # same content
    restarted.set_health("payment", "p-1", NOT_SERVING, T0 + 101)
    after = await Publisher(restarted, store, 0.1, TD).publish_now()
    assert int(after.version) == int(before.version) + 2


def test_a_raw_document_is_published_as_is_under_the_given_version() -> None:
    raw = raw_published("9", '{"version": "x", "clusters": 5}')
    assert (raw.version, raw.json) == ("9", '{"version": "x", "clusters": 5}')
    assert raw.hash == content_hash({"version": "x", "clusters": 5})
    assert raw.message().snapshot.version == "9"
    assert raw_published("10", "not json").hash  # any text gets a hash


def test_the_compressed_push_is_built_once_per_version_and_inflates_to_the_document() -> None:
    doc = build_snapshot([inst("order", f"o-{i}", 20000 + i) for i in range(50)], "0").to_doc()
    published = raw_published("7", json.dumps(doc, separators=(",", ":")))
    plain, packed = published.message(), published.message(compressed=True)
    assert published.message(compressed=True) is packed  # shared by every session
    assert plain.snapshot.json == published.json and plain.snapshot.json_zlib == b""
    assert packed.snapshot.json == "" and (packed.snapshot.version, packed.snapshot.hash) == (
        "7", published.hash)
    assert zlib.decompress(packed.snapshot.json_zlib).decode() == published.json
    assert packed.ByteSize() * 5 < plain.ByteSize()


class _Gate:
    """A fake ``sleep``: each call waits until the test opens the gate once."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self._open = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await self._open.wait()
        self._open.clear()

    def open(self) -> None:
        self._open.set()


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_change_is_pushed_at_once_and_the_rest_of_the_window_coalesced() -> None:
    reg = EmbeddedRegistry(GRACE_S)
    gate = _Gate()
    pub = Publisher(reg, None, push_window_s=0.1, trust_domain=TD, sleep=gate)
    seen: list[str] = []
    pub.subscribe(lambda p: seen.append(p.version))
    await pub.start()
    try:
        assert seen == ["1"]
        reg.register(inst("payment", "p-1", 20001), T0)  # leading edge: at once
        await _settle()
        assert seen == ["1", "2"] and gate.calls == [0.1]
        for i in range(2, 6):  # within the window: held back
            reg.register(inst("payment", f"p-{i}", 20000 + i), T0)
        await _settle()
        assert seen == ["1", "2"]
        gate.open()  # the window ends: one push for all four
        await _settle()
        assert seen == ["1", "2", "3"]
        latest = pub.latest
        assert latest is not None
        cluster = from_json(latest.json, TD).cluster("payment")
        assert cluster is not None and len(cluster.endpoints) == 5
        gate.open()  # a quiet window: nothing more
        await _settle()
        assert seen == ["1", "2", "3"]
    finally:
        await pub.stop()


# ---------------------------------------------------------------------- the registry
def test_an_instance_leaves_only_after_its_grace_period() -> None:
    reg = EmbeddedRegistry(GRACE_S)
    reg.register(inst("payment", "p-1"), T0)
    assert reg.prune(T0 + 1000) == []  # connected: never pruned
    assert reg.disconnected("payment", "p-1", T0 + 1)
    assert not reg.disconnected("payment", "p-1", T0 + 2)  # already
    got = reg.get("payment", "p-1")
    assert got is not None and not got.connected and got.disconnected_at == T0 + 1
    assert reg.prune(T0 + 1 + GRACE_S) == []
    removed = reg.prune(T0 + 1 + GRACE_S + 0.01)
    assert [i.key for i in removed] == [("payment", "p-1")] and reg.instances() == []


def test_coming_back_within_the_grace_period_keeps_the_instance() -> None:
    reg = EmbeddedRegistry(GRACE_S)
    reg.register(inst("payment", "p-1"), T0)
    reg.disconnected("payment", "p-1", T0 + 1)
    back = reg.register(inst("payment", "p-1", 20005), T0 + 5)
    assert back.connected and back.disconnected_at is None and back.inbound == "127.0.0.1:20005"
    assert reg.prune(T0 + 100) == []


def test_set_health_notifies_only_on_a_change() -> None:
    reg = EmbeddedRegistry(GRACE_S)
    calls: list[int] = []
    unsubscribe = reg.subscribe(lambda: calls.append(1))
    reg.register(inst("payment", "p-1"), T0)
    assert len(calls) == 1
    assert not reg.set_health("payment", "p-1", SERVING, T0)
    assert reg.set_health("payment", "p-1", NOT_SERVING, T0)
    assert not reg.set_health("payment", "nobody", NOT_SERVING, T0)
    assert len(calls) == 2
    with pytest.raises(ValueError):
        reg.set_health("payment", "p-1", "GREAT", T0)
    unsubscribe()
    reg.set_health("payment", "p-1", SERVING, T0)
    assert len(calls) == 2


async def test_after_a_restart_the_grace_period_runs_from_the_restart(tmp_path: Path) -> None:
    reg = EmbeddedRegistry(GRACE_S, Store(tmp_path))
    reg.register(inst("payment", "p-1", labels={"version": "v2"}), T0)
    reg.register(inst("order", "o-1", health=NOT_SERVING), T0)
    reg.disconnected("order", "o-1", T0 + 1)  # long before the outage ends
    await reg.flush()

    restart = T0 + 3600  # the control plane was down for an hour
    back = EmbeddedRegistry.load(Store(tmp_path), GRACE_S, restart)
    loaded = back.instances()
    assert [i.key for i in loaded] == [("order", "o-1"), ("payment", "p-1")]
    assert all(not i.connected and i.disconnected_at == restart for i in loaded)
    assert loaded[1].labels == (("version", "v2"),) and loaded[0].health == NOT_SERVING
    assert back.prune(restart + GRACE_S) == []  # the outage emptied nothing
    back.register(inst("payment", "p-1"), restart + 2)  # it came back in time
    assert [i.key for i in back.prune(restart + GRACE_S + 0.01)] == [("order", "o-1")]
    await back.flush()
    assert [r.instance_id for r in Store(tmp_path).list_instances()] == ["p-1"]


async def test_close_flushes_and_a_memory_registry_needs_no_store(tmp_path: Path) -> None:
    store = Store(tmp_path)
    reg = EmbeddedRegistry(GRACE_S, store)
    await reg.start()
    reg.register(inst("payment", "p-1"), T0)
    await reg.close()
    assert [r.instance_id for r in store.list_instances()] == ["p-1"]
    memory = EmbeddedRegistry(GRACE_S)
    memory.register(inst("payment", "p-1"), T0)
    await memory.start()
    await memory.close()


@FAST
@given(events=st.lists(st.tuples(st.sampled_from(["register", "disconnect", "prune"]),
                                 st.sampled_from(["a", "b", "c"]),
                                 st.floats(0, 30)), max_size=30))
def test_prune_removes_exactly_the_expired_and_never_a_connected_instance(
        events: list[tuple[str, str, float]]) -> None:
    reg = EmbeddedRegistry(GRACE_S)
    now = T0
    for op, iid, dt_s in events:
        now += dt_s
        if op == "register":
            reg.register(inst("svc", iid), now)
        elif op == "disconnect":
            reg.disconnected("svc", iid, now)
        else:
            before = reg.instances()
            removed = reg.prune(now)
            assert removed == [i for i in before if expired(i, now, GRACE_S)]
            assert all(not i.connected for i in removed)
            assert all(not expired(i, now, GRACE_S) for i in reg.instances())


# ---------------------------------------------------------------------- telemetry
def _sample(service: str, ok: int, failed: int = 0,
            hist: Histogram | None = None) -> UpstreamSample:
    by_code = {"OK": ok} | ({"UNAVAILABLE": failed} if failed else {})
    return UpstreamSample(service, by_code, hist)


def test_rps_is_calls_over_the_seconds_the_reports_cover_summed_over_sidecars() -> None:
    tel = Telemetry(window_s=60)
    tel.add(("order", "o-1"), Report(T0 + 2, 2.0, (_sample("payment", 10),)))
    tel.add(("order", "o-1"), Report(T0 + 4, 2.0, (_sample("payment", 30),)))
    tel.add(("order", "o-1"), Report(T0 + 6, 2.0, ()))  # idle, still covered time
    tel.add(("order", "o-2"), Report(T0 + 5, 5.0, (_sample("payment", 25),)))
    [edge] = tel.edges(T0 + 6)
    assert (edge.source, edge.destination, edge.requests) == ("order", "payment", 65)
    assert edge.rps == pytest.approx(40 / 6 + 25 / 5)


def test_success_rate_is_ok_over_all_calls() -> None:
    tel = Telemetry(window_s=60)
    tel.add(("order", "o-1"), Report(T0, 1.0, (_sample("payment", 18, failed=2),
                                              _sample("inventory", 0, failed=4))))
    rates = {e.destination: e.success_rate for e in tel.edges(T0)}
    assert rates == {"inventory": 0.0, "payment": pytest.approx(0.9)}


def test_percentiles_interpolate_within_a_bucket_and_stop_at_the_last_bound() -> None:
    hist = Histogram((1.0, 5.0, 10.0), (5, 10, 5, 0))
    assert percentile_ms(hist, 0.5) == pytest.approx(3.0)    # rank 10: 1 + 4 * 5/10
    assert percentile_ms(hist, 0.99) == pytest.approx(9.8)   # rank 19.8: 5 + 5 * 4.8/5
    assert percentile_ms(Histogram((1.0, 5.0), (0, 0, 7)), 0.5) == 5.0
    assert percentile_ms(Histogram((2.0, 5.0), (4, 0, 0)), 0.5) == pytest.approx(1.0)
    assert percentile_ms(None, 0.5) == 0.0
    tel = Telemetry(window_s=60)
    tel.add(("order", "o-1"), Report(T0, 1.0, (_sample("payment", 10, hist=Histogram(
        (1.0, 5.0, 10.0), (5, 5, 0, 0))),)))
    tel.add(("order", "o-2"), Report(T0, 1.0, (_sample("payment", 10, hist=Histogram(
        (1.0, 5.0, 10.0), (0, 5, 5, 0))),)))
    [edge] = tel.edges(T0)
    assert (edge.p50_ms, edge.p99_ms) == (pytest.approx(3.0), pytest.approx(9.8))


def test_histograms_with_other_bounds_or_malformed_are_left_out_of_the_merge() -> None:
    main = Histogram((1.0, 5.0), (10, 10, 0))
    other = Histogram((2.0, 4.0, 8.0), (1, 1, 1, 0))
    bad = Histogram((5.0, 1.0), (1, 1, 1))
    assert merge_histograms([main, other, bad, main]) == Histogram((1.0, 5.0), (20, 20, 0))
    assert merge_histograms([bad, Histogram((1.0,), (0, 0))]) is None


def test_edges_come_from_the_window_only() -> None:
    tel = Telemetry(window_s=10)
    tel.add(("order", "o-1"), Report(T0, 2.0, (_sample("payment", 10),)))
    assert [e.destination for e in tel.edges(T0 + 9)] == ["payment"]
    assert tel.edges(T0 + 10) == []
    tel.add(("order", "o-1"), Report(T0 + 20, 2.0, (_sample("payment", 0),)))
    assert tel.edges(T0 + 20) == []  # no calls: no edge
    tel.add(("order", "o-1"), Report(T0 + 21, 5000.0, (_sample("payment", 10),)))
    [edge] = tel.edges(T0 + 21)
    assert edge.rps == pytest.approx(10 / (2 + 10))  # a long first interval counts as the window
    tel.forget(("order", "o-1"))
    assert tel.edges(T0 + 21) == []


def test_topology_lists_services_with_their_instances_and_health() -> None:
    tel = Telemetry(window_s=60)
    topo = tel.topology([inst("payment", "p-2", 20002, health=NOT_SERVING),
                         inst("payment", "p-1", 20001), inst("gateway", "g-1", None, health="")],
                        T0)
    assert [(s.name, [(i.instance, i.address, i.healthy) for i in s.instances])
            for s in topo.services] == [
        ("gateway", [("g-1", "", True)]),
        ("payment", [("p-1", "127.0.0.1:20001", True), ("p-2", "127.0.0.1:20002", False)])]
    assert topo.window_s == 60


@FAST
@given(counts=st.lists(st.integers(0, 1000), min_size=4, max_size=4),
       q1=st.floats(0, 1), q2=st.floats(0, 1))
def test_percentiles_are_monotonic_and_within_the_bounds(counts: list[int], q1: float,
                                                         q2: float) -> None:
    hist = Histogram((1.0, 2.5, 10.0), tuple(counts))
    lo, hi = sorted((q1, q2))
    assert 0.0 <= percentile_ms(hist, lo) <= percentile_ms(hist, hi) <= 10.0


# ---------------------------------------------------------------------- sync states
@pytest.mark.parametrize(("connected", "sent", "sent_at", "acked", "nacked", "state"), [
    (True, "5", T0, "5", "", SYNCED),
    (True, "5", T0, "5", "4", SYNCED),       # an old NACK does not matter once ACKed
    (True, "5", T0, "4", "5", NACKED),
    (True, "5", T0 - 60, "4", "5", NACKED),  # NACKED says more than STALE
    (True, "5", T0 - 3, "4", "", SYNCING),
    (True, "5", T0 - 11, "4", "", STALE),
    (True, "5", T0 - 11, "4", "4", STALE),   # a NACK of an older version
    (True, "", None, "", "", SYNCING),       # registered, nothing sent yet
    (False, "5", T0, "5", "", STALE),        # stream down
    (False, "5", T0, "4", "5", STALE),
])
def test_sync_state(connected: bool, sent: str, sent_at: float | None, acked: str, nacked: str,
                    state: str) -> None:
    assert sync_state(connected=connected, sent_version=sent, sent_at=sent_at,
                      acked_version=acked, nack_version=nacked, now=T0,
                      stale_after_s=10) == state


async def _drain(session: Session) -> list:
    out = []
    gen = session.outgoing()
    while not session.queue.empty():
        out.append(await anext(gen))
    return out


async def test_a_session_sends_only_the_newest_snapshot_and_tracks_its_answers() -> None:
    clock = [T0]
    s = Session(inst("order", "o-1"), T0, acked_version="3", clock=lambda: clock[0])
    assert s.state(T0, 10) == SYNCING
    s.push_snapshot(raw_published("4", "{}"))
    s.push_snapshot(raw_published("5", '{"a": 1}'))  # replaces 4 before it went out
    [msg] = await _drain(s)
    assert msg.snapshot.version == "5" and (s.sent_version, s.sent_at) == ("5", T0)
    assert not s.push_snapshot(raw_published("5", '{"a": 1}'))  # already sent
    assert s.state(T0 + 5, 10) == SYNCING and s.state(T0 + 11, 10) == STALE
    s.on_nack("5", "clusters[0].name: required string", T0 + 1)
    assert s.state(T0 + 1, 10) == NACKED
    s.on_ack("5", raw_published("5", '{"a": 1}').hash, T0 + 2)
    assert s.state(T0 + 2, 10) == SYNCED


async def test_a_session_that_accepts_zlib_gets_the_compressed_push_and_others_json() -> None:
    published = raw_published("4", '{"a": 1}')
    old = Session(inst("order", "o-1"), T0)
    new = Session(inst("order", "o-2"), T0, accepts_zlib=True)
    for s in (old, new):
        s.push_snapshot(published)
    [plain] = await _drain(old)
    [packed] = await _drain(new)
    assert plain is published.message() and plain.snapshot.json == '{"a": 1}'
    assert packed is published.message(compressed=True)
    assert zlib.decompress(packed.snapshot.json_zlib) == b'{"a": 1}'
    assert (new.sent_version, new.sent_hash) == ("4", published.hash)


async def test_a_newer_stream_replaces_the_older_one_and_queries_fail_when_it_closes() -> None:
    hub = SessionHub()
    first = Session(inst("order", "o-1"), T0)
    assert hub.open(first) is None
    qid, fut = first.query("config")
    second = Session(inst("order", "o-1"), T0 + 1)
    assert hub.open(second) is first
    assert not first.connected and first.close_code == "ABORTED"
    with pytest.raises(QueryFailed):
        await fut
    assert not hub.close(first)   # the old stream ending does not disconnect the instance
    assert hub.get(("order", "o-1")) is second

    qid, fut = second.query("config")
    [msg] = await _drain(second)
    assert (msg.query.id, msg.query.kind) == (qid, "config")
    assert second.answer(pb.QueryAnswer(id=qid, json="{}"))
    assert (await fut).json == "{}"
    assert not second.answer(pb.QueryAnswer(id=qid, json="{}"))  # once only
    assert hub.broadcast(raw_published("9", "{}")) == 1
    assert hub.close(second) and hub.connected() == []
    with pytest.raises(QueryFailed):
        second.query("config")
