"""Service discovery with real processes: a control plane, three services with dynamic sidecars
(web, outbound-only, calls echo and store), replicas that come, sicken, heal and die, an
invalid snapshot, a certificate rotation under load and a control-plane outage longer than the
grace period. The tests share one mesh and run in file order; each states what it leaves.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import queue
import signal
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.integration.test_cert_rotation import Load
from tests.integration.test_control_plane import (
    ControlPlaneProc,
    Workload,
    admin_channel,
    create_token,
    join,
    meshctl,
    mtls_channel,
    start_cp,
)
from tests.integration.test_dynamic_sidecar import admin_get, sidecar_cmd
from tests.support import procs
from tests.support.sidecar import REPO_ROOT

pytestmark = pytest.mark.timeout(180)

GRACE_S = 2.0
STALE_S = 3.0
REPORT_S = 0.5
CP_FLAGS = ("--grace-period-s", str(GRACE_S), "--push-window-ms", "50",
            "--stale-after-s", str(STALE_S), "--report-window-s", "20",
            "--enable-test-hooks", "--cert-ttl", "120")


class Mesh:
    """The processes of the shared mesh and ways to look at it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.api_port = procs.free_port()
        self.boot_port = procs.free_port()
        self.cp = self._start_cp()
        self.apps: dict[str, procs.Proc] = {}
        self.sidecars: dict[str, procs.Proc] = {}
        self.tokens: dict[str, str] = {}
        self._channel: grpc.Channel | None = None

    def _start_cp(self) -> ControlPlaneProc:
        return start_cp(self.base / "ca", self.base / "data",
                        "--listen", f"127.0.0.1:{self.api_port}",
                        "--bootstrap-listen", f"127.0.0.1:{self.boot_port}", *CP_FLAGS)

    def restart_cp(self) -> None:
        self.cp = self._start_cp()

    def admin(self) -> pb_grpc.AdminStub:
        if self._channel is None:
            self._channel = admin_channel(self.cp)
        return pb_grpc.AdminStub(self._channel)

    def token(self, service: str) -> str:
        if service not in self.tokens:
            self.tokens[service] = create_token(self.cp, service)
        return self.tokens[service]

    def start(self, service: str, instance: str, *, app: bool = True,
              labels: tuple[str, ...] = (), extra: tuple[str, ...] = (),
              app_args: tuple[str, ...] = ()) -> procs.Proc:
        """A sidecar for ``instance`` of ``service`` (``extra``: more sidecar flags) and, with
        ``app``, an echo server behind it (``app_args``: more echo server flags)."""
        args = ["--service", service, "--instance-id", instance, "--token", self.token(service),
                "--health-interval-s", "0.3", "--report-interval-s", str(REPORT_S),
                "--max-backoff-s", "0.5", *extra]
        if app:
            srv = procs.start([sys.executable, "-m", "tests.support.echo_server", "--port", "0",
                               "--server-id", instance, *app_args], cwd=REPO_ROOT,
                              log_dir=self.base)
            self.apps[instance] = srv
            args += ["--app", f"127.0.0.1:{srv.ready['port']}"]
        for label in labels:
            args += ["--label", label]
        sc = procs.start(sidecar_cmd(*args), cwd=REPO_ROOT, log_dir=self.base)
        self.sidecars[instance] = sc
        return sc

    def status(self) -> dict[str, pb.SidecarStatus]:
        resp = self.admin().ListSidecars(pb.ListSidecarsRequest(), timeout=5)
        return {s.instance: s for s in resp.sidecars}

    def held(self, instance: str) -> dict[str, Any]:
        """The snapshot document the sidecar holds, asked through the control plane."""
        resp = self.admin().GetSidecarConfig(pb.GetSidecarConfigRequest(instance=instance),
                                             timeout=10)
        return json.loads(resp.json)

    def endpoints(self, caller: str, service: str) -> dict[str, bool]:
        """instance -> healthy, for ``service``'s cluster in ``caller``'s snapshot."""
        doc = self.held(caller)["snapshot"]
        for c in doc["clusters"]:
            if c["name"] == service:
                return {e["instance"]: e["healthy"] for e in c["endpoints"]}
        return {}

    def all_synced(self, instances: set[str]) -> bool:
        st = self.status()
        return set(st) == instances and all(s.state == "SYNCED" for s in st.values())

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        for p in [*self.sidecars.values(), *self.apps.values()]:
            p.stop(timeout_s=5)
        assert self.cp.proc.stop() == 0, self.cp.proc.log_tail()


def round_robin(mesh: Mesh, service: str) -> None:
    """Apply a TrafficPolicy balancing ``service`` round robin, and wait until every sidecar
    of the mesh holds it. For tests that count which replicas answer a few sequential calls:
    round robin makes "every replica gets its turn" a fact, where peak-EWMA (the default)
    rightly keeps sending to whichever answered fastest (the balancers have tests of their
    own)."""
    doc = {"kind": "TrafficPolicy", "name": service,
           "spec": {"service": service, "load_balancer": "round_robin"}}
    mesh.admin().ApplyConfig(pb.ApplyConfigRequest(documents=[pb.ConfigDocument(
        source="test", index=1, json=json.dumps(doc))]), timeout=10)

    def held() -> bool:
        return all(any(r["service"] == service and r["load_balancer"] == "round_robin"
                       for r in mesh.held(name)["snapshot"]["routes"])
                   for name in mesh.sidecars)

    procs.wait_for(held, 15, interval_s=0.2, what=f"the round-robin policy of {service} "
                   "in every sidecar's snapshot")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("discovery"))
    try:
        m.start("echo", "echo-1", labels=("version=v1",))
        m.start("echo", "echo-2", labels=("version=v2",))
        m.start("store", "store-1")
        m.start("web", "web-1", app=False)
        procs.wait_for(lambda: m.all_synced({"echo-1", "echo-2", "store-1", "web-1"}), 20,
                       what="every sidecar registered and SYNCED")
        round_robin(m, "echo")
        procs.wait_for(lambda: m.all_synced({"echo-1", "echo-2", "store-1", "web-1"}), 20,
                       what="every sidecar SYNCED with the echo policy")
        yield m
    finally:
        m.close()
    for p in m.sidecars.values():
        assert "mesh1." not in p.log_text(), "a token string reached a sidecar's log"


def stub(mesh: Mesh, service: str, caller: str = "web-1") -> tuple[grpc.Channel,
                                                                  echo_pb2_grpc.EchoStub]:
    ch = grpc.insecure_channel(mesh.sidecars[caller].ready["outbound"],
                               options=[("grpc.default_authority", service)])
    return ch, echo_pb2_grpc.EchoStub(ch)


def spread(mesh: Mesh, service: str, n: int) -> collections.Counter[str]:
    """Which replicas answered ``n`` calls (each must succeed)."""
    ch, st = stub(mesh, service)
    with ch:
        return collections.Counter(st.Unary(echo_pb2.EchoRequest(payload=b"x"), timeout=5).server_id
                                   for _ in range(n))


def _rfc3339(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def test_every_sidecar_is_synced_and_holds_every_service(mesh: Mesh) -> None:
    r = meshctl(mesh.cp, "status", "-o", "json")
    assert r.returncode == 0, r.stderr
    rows = {row["instance"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"echo-1", "echo-2", "store-1", "web-1"}
    versions = {row["acked_version"] for row in rows.values()}
    assert len(versions) == 1 and versions != {""}, versions
    for name, row in rows.items():
        assert row["state"] == "SYNCED", row
        assert row["service"] == name.split("-")[0]
        assert _rfc3339(row["cert_not_after"]) > dt.datetime.now(dt.UTC), row
        assert row["admin"].startswith("127.0.0.1:") and row["outbound"].startswith("127.0.0.1:")
        assert (row["inbound"] == "") == (name == "web-1"), row
    assert rows["echo-1"]["inbound"] == mesh.sidecars["echo-1"].ready["inbound"]

    table = meshctl(mesh.cp, "status")
    assert table.returncode == 0 and "SYNCED" in table.stdout and "echo-2" in table.stdout

    r = meshctl(mesh.cp, "config", "web", "-o", "json")  # a service with one instance
    assert r.returncode == 0, r.stderr
    held = json.loads(r.stdout)
    assert held["instance"] == "web-1" and held["version"] == rows["web-1"]["acked_version"]
    clusters = {c["name"]: c for c in held["snapshot"]["clusters"]}
    assert set(clusters) == {"echo", "store"}  # web has no inbound: not an endpoint
    labels = {e["instance"]: e["labels"] for e in clusters["echo"]["endpoints"]}
    assert labels == {"echo-1": {"version": "v1"}, "echo-2": {"version": "v2"}}
    assert {e["spiffe_id"] for e in clusters["echo"]["endpoints"]} == {
        "spiffe://mesh.local/service/echo"}

    several = meshctl(mesh.cp, "config", "echo")
    assert several.returncode != 0 and "echo-1" in several.stderr and "echo-2" in several.stderr
    assert len(several.stderr.strip().splitlines()) == 1, several.stderr

    assert set(spread(mesh, "echo", 20)) == {"echo-1", "echo-2"}
    assert set(spread(mesh, "store", 4)) == {"store-1"}


def test_every_sidecar_takes_its_snapshots_compressed_and_applies_them(mesh: Mesh) -> None:
    status = mesh.status()
    for name, sc in mesh.sidecars.items():
        d = admin_get(sc, "/stats")[1]["discovery"]
        # Every push answered came as json_zlib: the first one and at least the echo policy.
        assert d["compressed"] >= 2 and d["compressed"] == d["acks"] + d["nacks"], (name, d)
        assert d["swaps"] >= 2 and d["version"] == status[name].acked_version, (name, d)
        assert any(r["service"] == "echo" and r["load_balancer"] == "round_robin"
                   for r in mesh.held(name)["snapshot"]["routes"]), name


def test_a_client_that_does_not_accept_zlib_still_gets_json(mesh: Mesh) -> None:
    """A raw stream registers without ``accepts_zlib_snapshot`` (an older sidecar), then
    with it: the same snapshot comes as json, then as json_zlib. Leaves: nothing (the
    outbound-only instance it registered is waited out of the registry)."""
    wl = Workload()
    join(mesh.token("web"), wl, csr_service="web", instance="web-raw")
    pushes: dict[bool, pb.SnapshotPush] = {}
    for accepts in (False, True):
        outbox: queue.Queue[pb.SidecarMessage | None] = queue.Queue()
        outbox.put(pb.SidecarMessage(register=pb.Register(
            instance_id="web-raw", accepts_zlib_snapshot=accepts)))

        def messages(box: queue.Queue[pb.SidecarMessage | None] = outbox
                     ) -> Iterator[pb.SidecarMessage]:
            while (msg := box.get()) is not None:
                yield msg

        with mtls_channel(mesh.cp, wl) as ch:
            stream = pb_grpc.DiscoveryStub(ch).Stream(messages(), timeout=30)
            try:
                first = next(stream)
            finally:
                outbox.put(None)
                stream.cancel()
        assert first.WhichOneof("msg") == "snapshot", first
        pushes[accepts] = first.snapshot
    plain, packed = pushes[False], pushes[True]
    assert plain.json and plain.json_zlib == b"", plain
    assert packed.json == "" and packed.json_zlib
    assert zlib.decompress(packed.json_zlib).decode() == plain.json
    assert (packed.version, packed.hash) == (plain.version, plain.hash)
    assert len(packed.json_zlib) < len(plain.json)
    procs.wait_for(lambda: "web-raw" not in mesh.status(), 15, interval_s=0.2,
                   what="web-raw out of the registry after its grace period")


def test_a_third_replica_appears_in_the_callers_snapshot_and_gets_traffic(mesh: Mesh) -> None:
    mesh.start("echo", "echo-3", labels=("version=v2",))
    procs.wait_for(lambda: set(mesh.endpoints("web-1", "echo")) == {"echo-1", "echo-2",
                                                                     "echo-3"},
                   15, what="echo-3 in web's snapshot")
    assert spread(mesh, "echo", 30)["echo-3"] >= 5


def test_an_unhealthy_replica_gets_no_traffic_until_it_recovers(mesh: Mesh) -> None:
    mesh.apps["echo-2"].signal(signal.SIGUSR1)  # its health check now says NOT_SERVING
    procs.wait_for(lambda: mesh.endpoints("web-1", "echo").get("echo-2") is False, 15,
                   what="echo-2 unhealthy in web's snapshot")
    seen = spread(mesh, "echo", 40)
    assert "echo-2" not in seen and set(seen) == {"echo-1", "echo-3"}, seen
    topo = mesh.admin().Topology(pb.TopologyRequest(), timeout=5)
    health = {i.instance: i.healthy for s in topo.services for i in s.instances}
    assert health["echo-2"] is False and health["echo-1"] is True

    mesh.apps["echo-2"].signal(signal.SIGUSR2)
    procs.wait_for(lambda: mesh.endpoints("web-1", "echo").get("echo-2") is True, 15,
                   what="echo-2 healthy again in web's snapshot")
    assert spread(mesh, "echo", 30)["echo-2"] >= 5


def test_topology_shows_the_edges_that_carried_the_calls(mesh: Mesh) -> None:
    ch, st = stub(mesh, "echo")
    ch2, st2 = stub(mesh, "store")
    started = time.monotonic()
    calls = 0
    with ch, ch2:
        while time.monotonic() - started < 3.0 and calls < 2000:
            st.Unary(echo_pb2.EchoRequest(payload=b"t"), timeout=5)
            if calls % 4 == 0:
                st2.Unary(echo_pb2.EchoRequest(payload=b"t"), timeout=5)
            calls += 1
    rate = calls / (time.monotonic() - started)

    def edges() -> dict[tuple[str, str], dict[str, Any]] | None:
        r = meshctl(mesh.cp, "topology", "-o", "json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        found = {(e["source"], e["destination"]): e for e in doc["edges"]}
        return found if ("web", "store") in found and found[("web", "echo")]["requests"] >= calls \
            else None

    found = procs.wait_for(edges, 10, interval_s=0.3, what="both edges reported")
    echo = found[("web", "echo")]
    assert set(found) == {("web", "echo"), ("web", "store")}, found
    assert echo["success_rate"] == 1.0
    assert 0 < echo["p50_ms"] <= echo["p99_ms"] < 1000, echo
    # The report window covers this test's calls and the earlier tests': rps is of that order.
    assert 0.05 * rate < echo["rps"] < 3 * rate, (echo, rate)
    assert found[("web", "store")]["rps"] < echo["rps"]
    r = meshctl(mesh.cp, "topology")
    assert r.returncode == 0 and "web" in r.stdout and "store" in r.stdout, r.stdout


def test_certs_renew_under_traffic_reissues_every_certificate(mesh: Mesh) -> None:
    before = {i: s.cert_not_after_unix for i, s in mesh.status().items()}
    since = time.time()
    ch, st = stub(mesh, "echo")
    with ch:
        load = Load(st, max_s=30, max_calls=10**7)
        load.start()
        try:
            procs.wait_for(lambda: load.ok > 20, 10, what="load running")
            r = meshctl(mesh.cp, "certs", "renew")
            assert r.returncode == 0, r.stderr
            assert "5 sidecar" in r.stdout, r.stdout

            def reissued() -> bool:
                certs = mesh.admin().ListCertificates(pb.ListCertificatesRequest(), timeout=5)
                fresh = {c.instance_id for c in certs.certificates if c.issued_at_unix >= int(since)}
                return fresh >= set(before)

            procs.wait_for(reissued, 15, interval_s=0.2, what="a new certificate for every sidecar")
            ok_then = load.ok
            procs.wait_for(lambda: load.ok > ok_then + 50, 10, what="calls after the renewal")
        finally:
            load.finish()
    assert load.failures == [], load.failures[:5]
    procs.wait_for(lambda: all(s.cert_not_after_unix >= before[i]
                               for i, s in mesh.status().items()), 10,
                   what="the new expiries in meshctl status")
    r = meshctl(mesh.cp, "certs", "renew", "--service", "nosuch")
    assert r.returncode == 1 and "no connected sidecar" in r.stderr


def test_an_invalid_snapshot_is_nacked_shown_and_the_last_good_one_kept(mesh: Mesh) -> None:
    good = mesh.held("web-1")
    compressed = admin_get(mesh.sidecars["web-1"], "/stats")[1]["discovery"]["compressed"]
    bad = {"version": "x", "clusters": [], "routes": [{"service": "echo", "cluster": "nowhere"}]}
    pushed = mesh.admin().TestPushRawSnapshot(
        pb.TestPushRawSnapshotRequest(instance="web-1", json=json.dumps(bad)), timeout=5)

    def nacked() -> dict[str, Any] | None:
        r = meshctl(mesh.cp, "status", "-o", "json")
        rows = {row["instance"]: row for row in json.loads(r.stdout)}
        return rows["web-1"] if rows["web-1"]["state"] == "NACKED" else None

    row = procs.wait_for(nacked, 10, interval_s=0.2, what="web-1 NACKED in meshctl status")
    assert row["nack"]["version"] == pushed.version, row
    assert "routes[0].cluster" in row["nack"]["reason"], row
    assert row["acked_version"] == good["version"], row
    assert mesh.held("web-1") == good  # the last good snapshot is still in force
    # It came compressed, as every push to this sidecar does, and was checked all the same.
    assert admin_get(mesh.sidecars["web-1"], "/stats")[1]["discovery"]["compressed"] > \
        compressed
    assert set(spread(mesh, "echo", 9)) == {"echo-1", "echo-2", "echo-3"}
    table = meshctl(mesh.cp, "status")
    assert "NACKED" in table.stdout and "routes[0].cluster" in table.stdout, table.stdout


def test_a_killed_sidecars_instance_leaves_after_the_grace_period(mesh: Mesh) -> None:
    mesh.sidecars["echo-3"].kill()
    killed = time.monotonic()
    procs.wait_for(lambda: not mesh.status()["echo-3"].connected, 10,
                   what="echo-3's stream seen down")
    assert mesh.status()["echo-3"].state == "STALE"
    procs.wait_for(lambda: "echo-3" not in mesh.status(), 10, interval_s=0.1,
                   what="echo-3 removed from the registry")
    assert time.monotonic() - killed >= GRACE_S * 0.9
    procs.wait_for(lambda: set(mesh.endpoints("web-1", "echo")) == {"echo-1", "echo-2"}, 10,
                   what="echo-3 gone from web's snapshot")
    mesh.apps.pop("echo-3").stop(timeout_s=5)
    mesh.sidecars.pop("echo-3")
    # The next real snapshot replaced the NACKed one: every sidecar is in sync again.
    procs.wait_for(lambda: mesh.all_synced({"echo-1", "echo-2", "store-1", "web-1"}), 10,
                   what="every sidecar SYNCED")


def test_a_control_plane_outage_longer_than_grace_loses_no_call_and_no_instance(
        mesh: Mesh) -> None:
    instances = {"echo-1", "echo-2", "store-1", "web-1"}
    version = mesh.status()["web-1"].acked_version
    ch, st = stub(mesh, "echo")
    with ch:
        load = Load(st, max_s=40, max_calls=10**7)
        load.start()
        try:
            procs.wait_for(lambda: load.ok > 20, 10, what="load running")
            if mesh._channel is not None:
                mesh._channel.close()
                mesh._channel = None
            assert mesh.cp.proc.stop() == 0, mesh.cp.proc.log_tail()
            down_ok = load.ok
            deadline = time.monotonic() + GRACE_S * 2
            procs.wait_for(lambda: time.monotonic() >= deadline, GRACE_S * 2 + 5,
                           what="the outage to outlast the grace period")
            assert load.ok > down_ok + 20, "calls stopped while the control plane was away"
            for name in instances:
                assert admin_get(mesh.sidecars[name], "/ready")[0] == 200
            mesh.restart_cp()
            # Loaded from disk: every instance is there at once, none pruned by the outage.
            assert set(mesh.status()) == instances
            procs.wait_for(lambda: mesh.all_synced(instances), 15, interval_s=0.2,
                           what="every sidecar SYNCED after the restart")
            assert int(mesh.status()["web-1"].acked_version) >= int(version)
            after = load.ok
            procs.wait_for(lambda: load.ok > after + 20, 10, what="calls after the restart")
        finally:
            load.finish()
    assert load.failures == [], load.failures[:5]
    assert set(spread(mesh, "echo", 10)) == {"echo-1", "echo-2"}


def test_a_sidecar_tries_the_control_planes_of_its_list_in_turn(mesh: Mesh) -> None:
    dead = f"127.0.0.1:{procs.free_port()}"  # nothing listens there
    mesh.start("store", "store-2", extra=("--control-plane", f"{dead},{mesh.cp.api}"))
    procs.wait_for(lambda: mesh.status()["store-2"].state == "SYNCED", 15,
                   what="store-2 SYNCED through the second address of its list")
    procs.wait_for(lambda: "store-2" in mesh.endpoints("web-1", "store"), 10,
                   what="store-2 in web's snapshot")
    stats = admin_get(mesh.sidecars["store-2"], "/stats")[1]["discovery"]
    assert stats["connected"] and stats["control_plane"] == mesh.cp.api, stats
    assert stats["failures"] >= 1 and dead in stats["last_error"], stats  # the dead one first
