"""The sidecar's side of discovery without a control plane: the Stats layer's latency
histogram and report deltas, the ``--label``/``--control-plane``/``--ewma-decay-s`` flags
(the last one to the outbound balancer of a sidecar run in-process), what the sidecar
answers to each control message (``DiscoveryState.handle``), the messages it builds, its
backoff, and one stream session against an in-process fake control plane on loopback."""

from __future__ import annotations

import asyncio
import json
import random
import tracemalloc
import zlib
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import yaml

from mesh_common.jointoken import new_token
from mesh_common.snapshot import (
    Cluster,
    Endpoint,
    RouteRule,
    Snapshot,
    SnapshotError,
    content_hash,
)
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from sidecar.discovery import (
    MAX_INFLATED_SNAPSHOT_BYTES,
    DiscoveryClient,
    DiscoveryState,
    Registration,
    backoff_s,
    push_document,
    register_message,
    report_message,
)
from sidecar.layers.balance import Balance
from sidecar.layers.stats import LATENCY_BOUNDS_MS, Stats, StatsReport, latency_bucket
from sidecar.main import UsageError, main, parse_control_planes, parse_labels
from sidecar.process import Sidecar
from sidecar.rpc import Channel
from tests.support.pki import CA
from tests.support.sidecar import sidecar_config

TD = "mesh.local"


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ep(port: int, service: str = "echo", instance: str = "", healthy: bool = True) -> Endpoint:
    return Endpoint("127.0.0.1", port, f"spiffe://{TD}/service/{service}", instance,
                    healthy=healthy)


def ended(stats: Stats, clock: Clock, *, route: str = "echo", status: int | None = 0,
          latency_ms: float = 3.0, endpoint: Endpoint | None = None) -> None:
    """One call that started ``latency_ms`` before now and ends now."""
    call = SimpleNamespace(grpc_status=status, route=route, endpoint=endpoint,
                           started_s=clock.now - latency_ms / 1e3, ended_s=clock.now)
    stats.on_end(call)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- histogram and deltas
def test_latency_buckets_are_inclusive_upper_bounds_with_one_overflow_bucket() -> None:
    assert latency_bucket(0.0) == 0
    assert latency_bucket(1.0) == 0
    assert latency_bucket(1.001) == 1
    assert latency_bucket(10_000.0) == len(LATENCY_BOUNDS_MS) - 1
    assert latency_bucket(10_000.1) == len(LATENCY_BOUNDS_MS)
    assert list(LATENCY_BOUNDS_MS) == sorted(LATENCY_BOUNDS_MS)


def test_report_counts_calls_by_status_and_latency_per_upstream_since_the_last_report() -> None:
    clock = Clock()
    stats = Stats(clock)
    a, b = ep(1001, instance="echo-1"), ep(1002, instance="echo-2")
    ended(stats, clock, latency_ms=0.5, endpoint=a)
    ended(stats, clock, latency_ms=3, endpoint=a)
    ended(stats, clock, status=14, latency_ms=30_000, endpoint=b)
    ended(stats, clock, route="store", status=None, latency_ms=7)
    ended(stats, clock, route="", status=14)  # no route: only in the totals
    clock.now += 2.5
    report = stats.take_report()

    assert report.interval_s == pytest.approx(2.5)
    assert set(report.upstreams) == {"echo", "store"}
    echo = report.upstreams["echo"]
    assert echo.by_code == {"OK": 2, "UNAVAILABLE": 1} and echo.calls == 3
    assert len(echo.latency_counts) == len(LATENCY_BOUNDS_MS) + 1
    assert echo.latency_counts[0] == 1 and echo.latency_counts[2] == 1  # <=1 ms, <=5 ms
    assert echo.latency_counts[-1] == 1  # above the last bound
    assert report.upstreams["store"].by_code == {"RESET": 1}
    assert report.endpoints == {"127.0.0.1:1001": (2, 0), "127.0.0.1:1002": (1, 1)}

    # The next report holds only what happened since.
    clock.now += 1.0
    ended(stats, clock, endpoint=a)
    again = stats.take_report()
    assert again.interval_s == pytest.approx(1.0)
    assert set(again.upstreams) == {"echo"} and again.upstreams["echo"].by_code == {"OK": 1}
    assert sum(again.upstreams["echo"].latency_counts) == 1
    assert again.endpoints == {"127.0.0.1:1001": (1, 0)}
    assert stats.take_report().upstreams == {}

    # /stats keeps its totals since start, whatever was reported.
    assert stats.snapshot() == {"by_status": {"OK": 3, "UNAVAILABLE": 2, "RESET": 1},
                                "by_route": {"echo": 4, "store": 1}}


def test_an_endpoint_of_several_snapshots_is_reported_once_by_address() -> None:
    clock = Clock()
    stats = Stats(clock)
    old, new = ep(1001), ep(1001)  # equal values, distinct objects (two snapshots)
    ended(stats, clock, endpoint=old)
    ended(stats, clock, status=4, endpoint=new)
    assert stats.take_report().endpoints == {"127.0.0.1:1001": (2, 1)}


# ---------------------------------------------------------------------- flags
def test_labels_parse_and_bad_forms_are_one_clear_line() -> None:
    assert parse_labels(["version=v2", "zone=a/b", "empty="]) == {
        "version": "v2", "zone": "a/b", "empty": ""}
    assert parse_labels([]) == {}
    for bad, why in (("version", "expected KEY=VALUE"), ("=v1", "bad key"),
                     ("sp ace=x", "bad key"), ("k" * 64 + "=x", "bad key"),
                     ("v=" + "x" * 254, "at most 253")):
        with pytest.raises(UsageError, match=why):
            parse_labels([bad])
    with pytest.raises(UsageError, match="given twice"):
        parse_labels(["a=1", "a=2"])


def test_control_plane_accepts_a_comma_separated_list() -> None:
    assert parse_control_planes("127.0.0.1:1, localhost:2") == ["127.0.0.1:1", "localhost:2"]
    for bad in ("", "127.0.0.1:1,", "nohost", "127.0.0.1:1,127.0.0.1:99999"):
        with pytest.raises(UsageError):
            parse_control_planes(bad)


@pytest.mark.parametrize("args, words", [
    (["--service", "web", "--token", "x", "--label", "version"], "--label: expected KEY=VALUE"),
    (["--config", "any.yaml", "--label", "version=v1"], "--label only with --token"),
    (["--service", "web", "--token", "x", "--control-plane", "a:1,,b:2"], "--control-plane"),
    (["--service", "web", "--token", "x", "--instance-id", "a b"], "--instance-id"),
    *((["--config", "any.yaml", "--ewma-decay-s", bad], "--ewma-decay-s")
      for bad in ("0", "-1", "abc", "nan", "inf")),
])
def test_bad_flags_exit_2_with_one_line(capsys: pytest.CaptureFixture[str],
                                        args: list[str], words: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args, decay_s", [([], 10.0), (["--ewma-decay-s", "2.5"], 2.5)])
def test_ewma_decay_s_is_the_outbound_balancers_time_constant(
        pki: CA, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, args: list[str],
        decay_s: float) -> None:
    """Standalone: ``main`` runs the sidecar in-process; once it serves, its outbound stack's
    Balance is read and the sidecar stops (drains) as on SIGTERM."""
    config = tmp_path / "web.yaml"
    config.write_text(yaml.safe_dump(sidecar_config(service="web",
                                                    tls=pki.issue_workload("web"))))
    seen: list[float] = []
    serve = Sidecar.wait_stopped

    async def read_then_stop(self: Sidecar) -> None:
        balance = self.stacks["outbound"].layer(Balance)
        assert balance is not None
        seen.append(balance.decay_s)
        self._stop.set()
        await serve(self)
    monkeypatch.setattr(Sidecar, "wait_stopped", read_then_stop)
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(config), *args])
    assert exc.value.code == 0 and seen == [decay_s]


def test_ewma_decay_s_reaches_the_dynamic_sidecar(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    async def serve_dynamic(*args: Any, **kwargs: Any) -> int:
        seen.update(kwargs)
        return 0
    monkeypatch.setattr("sidecar.main._serve_dynamic", serve_dynamic)
    token = new_token("0" * 64, "127.0.0.1:1", "127.0.0.1:2").encode()
    with pytest.raises(SystemExit) as exc:
        main(["--service", "web", "--token", token, "--ewma-decay-s", "0.5"])
    assert exc.value.code == 0 and seen["ewma_decay_s"] == 0.5


# ---------------------------------------------------------------------- handling control messages
STATIC = Snapshot("dynamic-0", clusters=(Cluster("store", (ep(2001, "store"),)),))


def discovered_doc(*ports: int, version: str = "7") -> dict[str, Any]:
    """A control plane's document: an ``echo`` cluster and a ``store`` one (shadowed by the
    static config)."""
    return {"version": version,
            "clusters": [{"name": "echo",
                          "endpoints": [{"address": f"127.0.0.1:{p}",
                                         "spiffe_id": f"spiffe://{TD}/service/echo",
                                         "instance": f"echo-{p}", "labels": {}, "healthy": True}
                                        for p in ports]},
                         {"name": "store", "endpoints": []}],
            "routes": [{"service": "echo", "cluster": "echo"}]}


def push(doc: dict[str, Any], version: str | None = None) -> pb.ControlMessage:
    v = version or doc["version"]
    return pb.ControlMessage(snapshot=pb.SnapshotPush(version=v, hash=content_hash(doc),
                                                      json=json.dumps(doc)))


def zlib_push(doc: dict[str, Any], version: str | None = None) -> pb.ControlMessage:
    """``push``, the document sent as ``json_zlib`` (as to a sidecar that accepts it)."""
    plain = push(doc, version).snapshot
    return pb.ControlMessage(snapshot=pb.SnapshotPush(
        version=plain.version, hash=plain.hash, json_zlib=zlib.compress(plain.json.encode())))


def zlib_of_zeros(mib: int) -> bytes:
    """A valid zlib stream of ``mib`` MiB of zeros (about 1 KiB a MiB), built from one
    compressed MiB repeated (each ends in a full flush, so none refers to the one before)
    instead of compressing all of it."""
    chunk = bytes(1 << 20)
    c = zlib.compressobj(9)
    first = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)  # with the zlib header
    again = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    adler32 = ((mib << 20) % 65521) << 16 | 1  # of that many zero bytes
    return first + again * (mib - 1) + b"\x03\x00" + adler32.to_bytes(4, "big")


class FakeSidecar:
    def __init__(self) -> None:
        self.snapshot = STATIC
        self.applied: list[Snapshot] = []
        self.renewals = 0

    def apply(self, snap: Snapshot) -> None:
        self.applied.append(snap)
        self.snapshot = snap

    def renew(self) -> None:
        self.renewals += 1

    def state(self) -> DiscoveryState:
        return DiscoveryState(STATIC, TD, current=lambda: self.snapshot, apply=self.apply,
                              renew=self.renew, wall_clock=lambda: 1000.0)


def test_a_valid_push_is_merged_with_the_static_clusters_swapped_in_and_acked() -> None:
    sc = FakeSidecar()
    state = sc.state()
    doc = discovered_doc(1001, 1002)
    [reply] = state.handle(push(doc))
    assert reply.WhichOneof("msg") == "ack"
    assert (reply.ack.version, reply.ack.hash) == ("7", content_hash(doc))
    assert len(sc.applied) == 1 and sc.snapshot.version == "7"
    echo, store = sc.snapshot.cluster("echo"), sc.snapshot.cluster("store")
    assert echo is not None and [e.port for e in echo.endpoints] == [1001, 1002]
    assert store is not None and [e.port for e in store.endpoints] == [2001]  # static wins
    assert (state.version, state.hash, state.acks, state.nacks) == ("7", content_hash(doc), 1, 0)


def test_an_invalid_push_is_nacked_with_the_field_and_changes_nothing() -> None:
    sc = FakeSidecar()
    state = sc.state()
    state.handle(push(discovered_doc(1001)))
    good = sc.snapshot
    bad = {"version": "8", "clusters": [], "routes": [{"service": "echo", "cluster": "nowhere"}]}
    [reply] = state.handle(push(bad))
    assert reply.WhichOneof("msg") == "nack" and reply.nack.version == "8"
    assert reply.nack.reason.startswith("routes[0].cluster: ") and "\n" not in reply.nack.reason
    assert sc.snapshot is good and len(sc.applied) == 1
    assert (state.version, state.nacks) == ("7", 1)
    assert state.last_nack == {"version": "8", "reason": reply.nack.reason, "at_unix": 1000.0}
    [reply] = state.handle(pb.ControlMessage(snapshot=pb.SnapshotPush(version="9", json="{")))
    assert reply.nack.reason.startswith("snapshot: not valid JSON")
    # A foreign trust domain is refused too.
    foreign = discovered_doc(1001, version="10")
    foreign["clusters"][0]["endpoints"][0]["spiffe_id"] = "spiffe://evil.example/service/echo"
    [reply] = state.handle(push(foreign))
    assert "spiffe_id" in reply.nack.reason and sc.snapshot is good


def test_a_push_with_the_hash_in_force_is_acked_without_a_swap() -> None:
    sc = FakeSidecar()
    state = sc.state()
    doc = discovered_doc(1001)
    state.handle(push(doc))
    [reply] = state.handle(push(doc, version="12"))
    assert reply.WhichOneof("msg") == "ack" and reply.ack.version == "12"
    assert len(sc.applied) == 1 and state.version == "12" and state.acks == 2


def test_a_compressed_push_is_inflated_checked_and_applied_like_a_plain_one() -> None:
    sc = FakeSidecar()
    state = sc.state()
    doc = discovered_doc(1001, 1002)
    [reply] = state.handle(zlib_push(doc))
    assert (reply.WhichOneof("msg"), reply.ack.version, reply.ack.hash) == (
        "ack", "7", content_hash(doc))
    echo = sc.snapshot.cluster("echo")
    assert echo is not None and [e.port for e in echo.endpoints] == [1001, 1002]
    assert (state.swaps, state.compressed) == (1, 1)
    bad = {"version": "8", "clusters": [], "routes": [{"service": "echo", "cluster": "nowhere"}]}
    [reply] = state.handle(zlib_push(bad))  # the same validation as for json
    assert reply.nack.reason.startswith("routes[0].cluster: ") and sc.snapshot.version == "7"
    [reply] = state.handle(zlib_push(doc, version="9"))  # the hash in force: no swap
    assert reply.ack.version == "9" and (state.swaps, state.compressed) == (1, 3)


def test_a_decompression_bomb_is_nacked_without_inflating_it_and_the_last_snapshot_kept(
        ) -> None:
    sc = FakeSidecar()
    state = sc.state()
    state.handle(push(discovered_doc(1001)))
    good = sc.snapshot
    bomb = zlib_of_zeros(1024)  # 1 GiB of zeros in 1 MiB
    assert len(bomb) < 2 << 20
    tracemalloc.start()
    try:
        [reply] = state.handle(pb.ControlMessage(snapshot=pb.SnapshotPush(
            version="8", hash="h8", json_zlib=bomb)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.WhichOneof("msg") == "nack" and reply.nack.version == "8"
    assert reply.nack.reason == (f"snapshot: json_zlib inflates to more than "
                                 f"{MAX_INFLATED_SNAPSHOT_BYTES} bytes ({len(bomb)} bytes "
                                 "compressed)")
    # zlib's output blocks and their join: about twice the cap, nowhere near the 1 GiB.
    assert peak < 3 * MAX_INFLATED_SNAPSHOT_BYTES + 4 * len(bomb), peak
    assert sc.snapshot is good and len(sc.applied) == 1
    assert (state.version, state.nacks, state.last_nack and state.last_nack["version"]) == (
        "7", 1, "8")


@pytest.mark.parametrize(("push_", "reason"), [
    (pb.SnapshotPush(json_zlib=b"not zlib"), "snapshot: json_zlib is not valid zlib: "),
    (pb.SnapshotPush(json_zlib=zlib.compress(b'{"version": "1"}')[:-6]),
     "snapshot: json_zlib is truncated"),
    (pb.SnapshotPush(json_zlib=zlib.compress(b"{}") + b"more"),
     "snapshot: json_zlib has data after the end of its stream"),
    (pb.SnapshotPush(json_zlib=zlib.compress(b"\xff{}")), "snapshot: json_zlib is not UTF-8"),
    (pb.SnapshotPush(json="{}", json_zlib=zlib.compress(b"{}")),
     "snapshot: both json and json_zlib are set"),
])
def test_a_compressed_document_that_is_not_one_whole_zlib_stream_is_refused(
        push_: pb.SnapshotPush, reason: str) -> None:
    with pytest.raises(SnapshotError) as info:
        push_document(push_)
    assert str(info.value).startswith(reason), info.value


def test_the_inflate_cap_admits_a_document_of_exactly_the_cap() -> None:
    doc = b"{" + b" " * 998 + b"}"
    assert push_document(pb.SnapshotPush(json_zlib=zlib.compress(doc)), 1000) == doc.decode()
    with pytest.raises(SnapshotError, match="more than 999 bytes"):
        push_document(pb.SnapshotPush(json_zlib=zlib.compress(doc)), 999)
    assert push_document(pb.SnapshotPush(json="{}")) == "{}"


def test_a_config_query_answers_the_snapshot_in_force_and_an_unknown_kind_an_error() -> None:
    sc = FakeSidecar()
    state = sc.state()
    [before] = state.handle(pb.ControlMessage(query=pb.Query(id="q0", kind="config")))
    assert json.loads(before.answer.json) == {"version": "", "hash": "",
                                              "snapshot": STATIC.to_doc()}
    doc = discovered_doc(1001)
    state.handle(push(doc))
    [reply] = state.handle(pb.ControlMessage(query=pb.Query(id="q1", kind="config")))
    assert reply.answer.id == "q1" and reply.answer.error == ""
    held = json.loads(reply.answer.json)
    assert held["version"] == "7" and held["hash"] == content_hash(doc)
    assert held["snapshot"] == sc.snapshot.to_doc()
    assert {c["name"] for c in held["snapshot"]["clusters"]} == {"echo", "store"}
    [reply] = state.handle(pb.ControlMessage(query=pb.Query(id="q2", kind="secrets")))
    assert reply.answer.id == "q2" and reply.answer.json == ""
    assert "unknown query kind 'secrets'" in reply.answer.error


def test_renew_certificate_asks_the_identity_and_needs_no_reply() -> None:
    sc = FakeSidecar()
    state = sc.state()
    assert state.handle(pb.ControlMessage(renew=pb.RenewCertificate())) == []
    assert sc.renewals == 1
    assert state.handle(pb.ControlMessage()) == []  # a kind this sidecar does not know


# ---------------------------------------------------------------------- messages and backoff
def test_register_and_report_messages_carry_what_the_control_plane_needs() -> None:
    reg = Registration("web-1", inbound="", outbound="127.0.0.1:1", admin="127.0.0.1:2",
                       labels={"version": "v1"})
    msg = register_message(reg, health="", version="3", hash="abc", cert_not_after_unix=99)
    r = msg.register
    assert r.accepts_zlib_snapshot  # this sidecar reads json_zlib
    assert (r.instance_id, r.inbound, r.outbound, r.admin, dict(r.labels), r.health, r.version,
            r.hash, r.cert_not_after_unix) == ("web-1", "", "127.0.0.1:1", "127.0.0.1:2",
                                                {"version": "v1"}, "", "3", "abc", 99)
    clock = Clock()
    stats = Stats(clock)
    a = ep(1001, instance="echo-1")
    snap = Snapshot("1", clusters=(Cluster("echo", (a, ep(1002, instance="echo-2",
                                                           healthy=False))),),
                    routes=(RouteRule("echo", "echo"),))
    ended(stats, clock, endpoint=a, latency_ms=0.3)
    ended(stats, clock, endpoint=a, status=13, latency_ms=60)
    clock.now += 5
    rep = report_message(stats.take_report(), snap, health="SERVING",
                         cert_not_after_unix=99).report
    assert rep.interval_s == pytest.approx(5) and rep.health == "SERVING"
    assert rep.cert_not_after_unix == 99
    [up] = rep.upstreams
    assert up.service == "echo" and dict(up.by_code) == {"OK": 1, "INTERNAL": 1}
    assert list(up.latency.bounds_ms) == list(LATENCY_BOUNDS_MS)
    assert len(up.latency.counts) == len(LATENCY_BOUNDS_MS) + 1 and sum(up.latency.counts) == 2
    states = {e.instance: (e.service, e.address, e.healthy, e.requests, e.failures)
              for e in rep.endpoints}
    assert states == {"echo-1": ("echo", "127.0.0.1:1001", True, 2, 1),
                      "echo-2": ("echo", "127.0.0.1:1002", False, 0, 0)}


def test_backoff_is_full_jitter_capped() -> None:
    rng = random.Random(1)
    for attempt in range(40):
        limit = min(5.0, 0.2 * 2 ** attempt)
        delays = [backoff_s(attempt, rng, cap_s=5.0) for _ in range(50)]
        assert all(0.0 <= d <= limit for d in delays)
    assert max(backoff_s(30, rng, cap_s=0.5) for _ in range(50)) <= 0.5


# ---------------------------------------------------------------------- a session on loopback
class FakeControlPlane(pb_grpc.DiscoveryServicer):
    """Records what each stream sent; pushes ``doc`` after Register; ends the first stream
    once it has seen an Ack and a report (to check the resync)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.streams: list[list[pb.SidecarMessage]] = []
        self.resynced = asyncio.Event()

    async def Stream(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        seen: list[pb.SidecarMessage] = []
        self.streams.append(seen)
        first = len(self.streams) == 1
        async for msg in request_iterator:
            seen.append(msg)
            kind = msg.WhichOneof("msg")
            if kind == "register":
                yield push(self.doc)
                yield pb.ControlMessage(query=pb.Query(id="q", kind="config"))
            kinds = {m.WhichOneof("msg") for m in seen}
            if first and {"ack", "answer", "report"} <= kinds:
                return  # the control plane ends the stream: the sidecar must come back
            if not first and "ack" in kinds:
                self.resynced.set()


async def test_a_session_registers_acks_reports_and_resyncs_after_the_stream_ends() -> None:
    server = grpc.aio.server()
    cp = FakeControlPlane(discovered_doc(1001))
    pb_grpc.add_DiscoveryServicer_to_server(cp, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    unimplemented = grpc.aio.server()  # a control plane without the Discovery service
    dead_port = unimplemented.add_insecure_port("127.0.0.1:0")
    await unimplemented.start()
    sc = FakeSidecar()
    client = DiscoveryClient(
        sc.state(), Registration("web-1", outbound="127.0.0.1:1", admin="127.0.0.1:2"),
        addresses=[f"127.0.0.1:{dead_port}", f"127.0.0.1:{port}"],
        channel=Channel,
        take_report=lambda: StatsReport(0.05, {}, {}), health=lambda: "SERVING",
        cert_not_after_unix=lambda: 1234, report_interval_s=0.05, max_backoff_s=0.05)
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(10):
            await cp.resynced.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(None)
        await unimplemented.stop(None)
    first, second = cp.streams[0], cp.streams[1]
    assert first[0].WhichOneof("msg") == "register"
    reg = first[0].register
    assert (reg.instance_id, reg.health, reg.version, reg.cert_not_after_unix) == (
        "web-1", "SERVING", "", 1234)
    assert [m.WhichOneof("msg") for m in first[1:3]] == ["ack", "answer"]
    assert second[0].register.version == "7"  # the resync says what it runs
    assert second[0].register.hash == content_hash(discovered_doc(1001))
    assert sc.snapshot.version == "7" and len(sc.applied) == 1  # same hash: no second swap
    st = client.stats()
    assert st["reconnects"] >= 1 and st["acks"] >= 2 and st["version"] == "7"
    # In turn: UNIMPLEMENTED, the stream the control plane ended, UNIMPLEMENTED, the resync.
    assert st["failures"] == 3 and "UNIMPLEMENTED" in str(st["last_error"]), st
    assert st["connected"] is False  # cancelled
