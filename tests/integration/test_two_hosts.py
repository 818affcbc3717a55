"""Two hosts on one machine (issue 15): one Consul (the stand-in, tests/support/consul_standin.py)
and two "hosts", each binding its own loopback address: host A on 127.0.0.2, host B on
127.0.0.3. Each host runs its own control-plane replica (its own data and CA dirs, the same CA
files ``--ca-cert/--ca-key``, ``--registry consul://...``) and its own services behind dynamic
sidecars that list both replicas, their own host's first (``--control-plane`` and
``--bootstrap-address``).

* ``test_a_follower_forwards_and_takes_over_when_the_leader_stops`` (~15 s): echo on
  both hosts; the replica started first leads and alone signs; joins and renewals reaching
  the follower are forwarded (its counters say so, the leader's issuance counters grow, the
  follower's do not); ``Replica/Sign`` is refused to a workload and by a replica that does
  not lead; then the leader stops (SIGTERM, by PID) under load: the follower leads within a
  watch round (the lock is released, no lock-delay), no call fails, the sidecars of host A
  move to it, and a join and a renewal go through it.
* ``test_the_saga_runs_across_two_hosts_and_survives_the_leader_killed`` (~25 s): the
  demo's services (order and payment on A, inventory and payment on B, the load generator on
  A, the demo's authorization policies) run the order saga across the hosts and the audit
  (``demo_services.check.audit_demo``) passes; then the leader is killed (SIGKILL, by PID)
  under load: no call fails, the other replica leads once Consul drops the dead one's
  session (its TTL, 10 s here, plus a 1 s lock-delay), a new sidecar joins through it (the
  dead replica's join address first: a join tries each in turn), renewals go through it, and
  the audit still passes.
* ``test_consul_leadership_hands_over_and_a_leader_cut_off_steps_down``: the election
  alone, in-process: a clean stop hands over at once; a leader cut off from Consul for longer
  than its session's TTL stops leading.
* What each host is given: ``--advertise-host`` (tokens and the serving certificate name
  it), and a CA key file others may read is refused at start.

The demo services bind their host's address (apps, control endpoints, sidecars' listeners).
The payment replicas of both "hosts" share one SQLite file (as the demo's replicas do): one
machine, one filesystem.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509

from control_plane.ca import CertificateAuthority
from control_plane.ca import load as load_ca
from control_plane.consul_conn import target_from_env
from control_plane.leader import ConsulLeadership, LeaderInfo, replica_spiffe_id
from demo_services.check import audit_demo
from demo_services.launcher.admin import AdminClient, sync_gaps
from demo_services.launcher.procs import identity
from demo_services.launcher.state import DemoState, ProcessRecord
from demo_services.launcher.up import policy_documents
from mesh_common.jointoken import ANSWER_MAC_METADATA, check_answer_mac, join_proof, parse_token
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.integration.test_control_plane import ControlPlaneProc, Workload, create_token
from tests.integration.test_registry_contract import StandIn, eventually
from tests.support import procs
from tests.support.sidecar import REPO_ROOT

HOST_A, HOST_B = "127.0.0.2", "127.0.0.3"
TD = "mesh.local"
LOCK_DELAY_S = 1.0
SESSION_TTL_S = 10.0
GRACE_S = 10.0
SIDECAR_FLAGS = ("--report-interval-s", "1", "--health-interval-s", "0.5",
                 "--max-backoff-s", "1", "--trace-sample-rate", "0", "--drain-timeout-s", "2")


# ---------------------------------------------------------------------- the pieces
def write_ca_files(directory: Path) -> tuple[Path, Path]:
    """One root CA as the files every host is given (the key mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.create_root(TD, dt.datetime.now(dt.UTC))
    cert, key = directory / "mesh-ca.pem", directory / "mesh-ca-key.pem"
    cert.write_bytes(ca.bundle_pem)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(ca.key_pem())
    return cert, key


@dataclass
class Replica:
    """One control-plane replica (a process on its host's address)."""

    name: str
    host: str
    cp: ControlPlaneProc

    @property
    def proc(self) -> procs.Proc:
        return self.cp.proc

    @property
    def api(self) -> str:
        return self.cp.api

    @property
    def bootstrap(self) -> str:
        return self.cp.bootstrap

    @property
    def replica_id(self) -> str:
        return (self.cp.data_dir / "consul-replica-id").read_text().strip()

    def admin(self) -> AdminClient:
        return AdminClient(self.api, self.cp.ca_dir)

    def status(self) -> pb.ListSidecarsResponse:
        client = self.admin()
        try:
            return client.stub.ListSidecars(pb.ListSidecarsRequest(), timeout=5)
        finally:
            client.close()

    def leads(self) -> bool:
        resp = self.status()
        return resp.leader == resp.replica == self.replica_id

    def metric(self, series: str) -> float:
        """The value of one exposition line (``name{labels}`` exactly as exported), 0 when
        absent."""
        url = f"http://{self.proc.ready['admin_http']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name == series:
                return float(value)
        return 0.0


@dataclass
class Hosts:
    """Everything the test started, stopped (by PID) at the end in reverse order."""

    base: Path
    standin: StandIn
    prefix: str
    ca_cert: Path
    ca_key: Path
    started: list[procs.Proc] = field(default_factory=list)
    replicas: dict[str, Replica] = field(default_factory=dict)
    tokens: dict[str, Path] = field(default_factory=dict)

    def start(self, cmd: list[str], env: dict[str, str] | None = None,
              ready_timeout_s: float = 30) -> procs.Proc:
        p = procs.start(cmd, cwd=REPO_ROOT, log_dir=self.base, env=env,
                        ready_timeout_s=ready_timeout_s)
        self.started.append(p)
        return p

    def start_all(self, cmds: list[list[str]]) -> list[procs.Proc]:
        """Start every command at once (threads): the processes, in order."""
        with concurrent.futures.ThreadPoolExecutor(len(cmds)) as pool:
            return list(pool.map(self.start, cmds))

    def replica(self, name: str, host: str) -> Replica:
        d = self.base / name
        proc = self.start([sys.executable, "-m", "control_plane.main",
                           "--listen", f"{host}:0", "--bootstrap-listen", f"{host}:0",
                           "--admin-http", f"{host}:0", "--otlp-listen", "",
                           "--ca-dir", str(d / "ca"), "--ca-cert", str(self.ca_cert),
                           "--ca-key", str(self.ca_key), "--data-dir", str(d / "data"),
                           "--grace-period-s", str(GRACE_S), "--report-window-s", "10",
                           "--registry", self.standin.url, "--consul-prefix", self.prefix,
                           "--leader-ttl-s", str(SESSION_TTL_S),
                           "--leader-lock-delay-s", str(LOCK_DELAY_S)],
                          env={"CONSUL_HTTP_TOKEN": self.standin.token})
        r = Replica(name, host, ControlPlaneProc(proc, d / "ca", d / "data"))
        self.replicas[name] = r
        return r

    def token_file(self, service: str) -> Path:
        """A reusable join token for ``service`` (made on replica A), in a 0600 file."""
        if service not in self.tokens:
            path = self.base / f"{service}.token"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(create_token(self.replicas["a"].cp, service) + "\n")
            self.tokens[service] = path
        return self.tokens[service]

    def sidecar_cmd(self, service: str, instance: str, host: str, *, app: str | None = None,
                    outbound_port: int = 0, join_order: tuple[str, ...] | None = None
                    ) -> list[str]:
        """A dynamic sidecar on ``host`` (its listeners there), listing its own host's
        replica first, then the other (API and join addresses; ``join_order`` overrides the
        join list by replica name)."""
        own = "a" if host == HOST_A else "b"
        order = (own, "b" if own == "a" else "a")
        apis = ",".join(self.replicas[n].api for n in order if n in self.replicas)
        joins = ",".join(self.replicas[n].bootstrap for n in (join_order or order)
                         if n in self.replicas)
        doc: dict[str, Any] = {"outbound": {"listen": f"{host}:15001"},
                               "admin": {"listen": f"{host}:15000"}}
        if app is not None:
            doc["inbound"] = {"listen": f"{host}:15006"}
        config = self.base / f"{instance}.sidecar.yaml"
        config.write_text(yaml.safe_dump(doc))
        cmd = [sys.executable, "-m", "sidecar.main", "--config", str(config),
               "--service", service, "--instance-id", instance,
               "--token-file", str(self.token_file(service)), "--label", "version=v1",
               "--control-plane", apis, "--bootstrap-address", joins,
               "--inbound-port", "0", "--outbound-port", str(outbound_port),
               "--admin-port", "0", *SIDECAR_FLAGS]
        return cmd + (["--app", app] if app else [])

    def close(self) -> None:
        for p in reversed(self.started):
            p.stop(timeout_s=10)
        self.standin.proc.stop()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    (tmp_path / "consul").mkdir()
    standin = StandIn.start(tmp_path / "consul")
    cert, key = write_ca_files(tmp_path / "ca-files")
    h = Hosts(tmp_path, standin, f"two{uuid.uuid4().hex[:8]}", cert, key)
    try:
        yield h
    finally:
        h.close()


def start_leader_then_follower(h: Hosts) -> tuple[Replica, Replica]:
    """Replica A on host A, leading before replica B starts on host B (a follower)."""
    a = h.replica("a", HOST_A)
    procs.wait_for(a.leads, 15, what="replica A leading")
    b = h.replica("b", HOST_B)
    procs.wait_for(lambda: b.status().leader == a.replica_id, 15,
                   what="replica B knowing A leads")
    return a, b


def connected(r: Replica) -> set[str]:
    """The instances with a discovery stream on replica ``r``, SYNCED (the others' instances,
    known from Consul's catalog, have no stream there: STALE)."""
    return {s.instance for s in r.status().sidecars if s.connected and s.state == "SYNCED"}


def sidecar_stats(p: procs.Proc) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{p.ready['admin']}/stats", timeout=5) as r:
        return json.load(r)


def served(p: procs.Proc) -> int:
    """Calls a sidecar's inbound side answered OK."""
    return int(sidecar_stats(p)["inbound"]["calls"]["by_status"].get("OK", 0))


def renewals(p: procs.Proc) -> int:
    return int(sidecar_stats(p)["identity"]["renewals"])


def join_via(address: str, token: str, service: str, wl: Workload,
             instance: str) -> pb.JoinResponse:
    """Join ``service`` in-process through the join listener at ``address``, checking the
    answer's MAC with the token's secret (what a sidecar does)."""
    tok = parse_token(token)
    csr = wl.csr(service)
    with grpc.insecure_channel(address) as ch:
        resp, call = pb_grpc.BootstrapStub(ch).Join.with_call(
            pb.JoinRequest(token_id=tok.token_id, csr=csr, proof=join_proof(tok.secret, csr),
                           instance_id=instance), timeout=15)
    mac = next((bytes(v) for k, v in call.trailing_metadata() if k == ANSWER_MAC_METADATA), b"")
    assert check_answer_mac(tok.secret, csr, resp.certificate_pem, resp.trust_bundle_pem,
                            resp.spiffe_id, resp.otlp_endpoint, mac), "answer MAC"
    wl.cert_pem, wl.bundle_pem = resp.certificate_pem.encode(), resp.trust_bundle_pem.encode()
    return resp


def mtls(address: str, bundle: bytes, key_pem: bytes, cert_pem: bytes) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=bundle, private_key=key_pem,
                                         certificate_chain=cert_pem)
    return grpc.secure_channel(address, creds)


class Load:
    """Calls through one sidecar's outbound port in a thread, bounded by count and time; every
    failure is kept (code and details) and every answering server id counted."""

    def __init__(self, call: Callable[[], str], *, max_calls: int = 20_000,
                 max_s: float = 90.0, interval_s: float = 0.01) -> None:
        self._call = call
        self.max_calls, self.max_s, self.interval_s = max_calls, max_s, interval_s
        self.ok = 0
        self.failures: list[str] = []
        self.servers: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="load")

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        for _ in range(self.max_calls):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            try:
                server = self._call()
                self.ok += 1
                self.servers[server] = self.servers.get(server, 0) + 1
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
            self._stop.wait(self.interval_s)


# ---------------------------------------------------------------------- the fast variant
@pytest.mark.timeout(120)
def test_a_follower_forwards_and_takes_over_when_the_leader_stops(hosts: Hosts) -> None:
    h = hosts
    a, b = start_leader_then_follower(h)
    assert a.replica_id != b.replica_id
    assert b.status().replica == b.replica_id
    assert a.metric("mesh_cp_leader") == 1.0 and b.metric("mesh_cp_leader") == 0.0

    # Echo on each host; an outbound-only caller on host B. Host B's sidecars join through B.
    echo_a, echo_b = h.start_all([
        [sys.executable, "-m", "tests.support.echo_server", "--host", HOST_A, "--port", "0",
         "--server-id", "echo-a"],
        [sys.executable, "-m", "tests.support.echo_server", "--host", HOST_B, "--port", "0",
         "--server-id", "echo-b"]])
    sc_a, sc_b, caller = h.start_all([
        h.sidecar_cmd("echo", "echo-a", HOST_A, app=f"{HOST_A}:{echo_a.ready['port']}"),
        h.sidecar_cmd("echo", "echo-b", HOST_B, app=f"{HOST_B}:{echo_b.ready['port']}"),
        h.sidecar_cmd("caller", "caller-1", HOST_B)])
    assert str(sc_a.ready["inbound"]).startswith(f"{HOST_A}:")
    assert str(sc_b.ready["inbound"]).startswith(f"{HOST_B}:")

    # Only the leader signed: both of host B's joins went through B, forwarded unchanged.
    assert b.metric('mesh_cp_forwarded_total{outcome="ok",rpc="join"}') == 2.0
    assert a.metric('mesh_cp_certificates_issued_total{kind="join"}') == 3.0
    assert b.metric('mesh_cp_certificates_issued_total{kind="join"}') == 0.0
    # Each sidecar's discovery stream goes to its own host's replica.
    procs.wait_for(lambda: connected(b) == {"echo-b", "caller-1"} and connected(a) == {"echo-a"},
                   15, what="each host's sidecars on its own replica")
    client = b.admin()
    try:   # B reads the records the leader wrote (one store, in Consul's KV)
        certs = client.stub.ListCertificates(pb.ListCertificatesRequest(), timeout=5)
        assert {c.instance_id for c in certs.certificates} == {"echo-a", "echo-b", "caller-1"}
        # A renewal reaching the follower: authenticated by B, signed by A.
        told = client.stub.RenewCertificates(pb.RenewCertificatesRequest(), timeout=5)
        assert sorted(told.instances) == ["caller-1", "echo-b"]
    finally:
        client.close()
    procs.wait_for(lambda: renewals(sc_b) >= 1 and renewals(caller) >= 1, 15,
                   what="host B's sidecars renewed through B")
    assert b.metric('mesh_cp_forwarded_total{outcome="ok",rpc="renew"}') == 2.0
    assert a.metric('mesh_cp_certificates_issued_total{kind="renew"}') >= 2.0
    assert b.metric('mesh_cp_certificates_issued_total{kind="renew"}') == 0.0

    # An in-process join through the follower: the leader's answer and MAC arrive intact.
    token = h.token_file("probe").read_text().strip()
    wl = Workload()
    resp = join_via(b.bootstrap, token, "probe", wl, "probe-1")
    assert resp.spiffe_id == f"spiffe://{TD}/service/probe"
    bundle = (a.cp.ca_dir / "ca.pem").read_bytes()
    # Replica/Sign: refused to a workload; refused by a replica that does not lead.
    with mtls(a.api, bundle, wl.key_pem(), wl.cert_pem) as ch:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ReplicaStub(ch).Sign(pb.SignRequest(csr=wl.csr("probe"), service="probe"),
                                         timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "control-plane replicas only" in refused.value.details()  # type: ignore[attr-defined]
    ca = load_ca(h.ca_cert, h.ca_key, TD)   # the test holds the CA files, as a replica does
    replica_cert, replica_key = ca.issue_keypair(replica_spiffe_id(TD, "test-replica"), "r",
                                                 dt.datetime.now(dt.UTC), dt.timedelta(hours=1))
    with mtls(b.api, bundle, replica_key, replica_cert.pem) as ch:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ReplicaStub(ch).Sign(pb.SignRequest(csr=wl.csr("probe"), service="probe"),
                                         timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "not the leader" in refused.value.details()  # type: ignore[attr-defined]

    # The leader stops (SIGTERM, by PID) under load: it releases the lock and B leads at once.
    channel = grpc.insecure_channel(caller.ready["outbound"],
                                    options=[("grpc.default_authority", "echo")])
    stub = echo_pb2_grpc.EchoStub(channel)

    def echo_call() -> str:
        return stub.Unary(echo_pb2.EchoRequest(payload=b"x"), timeout=5).server_id

    with channel, Load(echo_call) as load:
        procs.wait_for(lambda: load.servers.get("echo-a", 0) >= 20 and
                       load.servers.get("echo-b", 0) >= 20, 20, what="load on both hosts")
        t0 = time.monotonic()
        assert a.proc.stop(timeout_s=15) == 0, a.proc.log_tail()
        procs.wait_for(b.leads, 8, what="replica B leading after A stopped")
        took_s = time.monotonic() - t0
        assert b.metric("mesh_cp_leader") == 1.0
        # Host A's sidecars move to B (their second control plane).
        procs.wait_for(lambda: connected(b) == {"echo-a", "echo-b", "caller-1"}, 20,
                       what="every sidecar on B")
        seen = dict(load.servers)
        procs.wait_for(lambda: load.servers["echo-a"] > seen["echo-a"] + 20 and
                       load.servers["echo-b"] > seen["echo-b"] + 20, 20,
                       what="both hosts still serving")
    assert not load.failures, load.failures[:5]
    assert took_s < 8, took_s
    assert "Traceback" not in a.proc.log_text(), a.proc.log_tail()

    # A join and a renewal go through B now, signed there.
    join_via(b.bootstrap, token, "probe", Workload(), "probe-2")
    assert b.metric('mesh_cp_certificates_issued_total{kind="join"}') == 1.0
    before = renewals(sc_a)
    client = b.admin()
    try:
        told = client.stub.RenewCertificates(pb.RenewCertificatesRequest(service="echo"),
                                             timeout=5)
        assert sorted(told.instances) == ["echo-a", "echo-b"]
    finally:
        client.close()
    procs.wait_for(lambda: renewals(sc_a) > before, 15, what="echo-a renewed through B")
    assert b.metric('mesh_cp_certificates_issued_total{kind="renew"}') >= 2.0
    r = subprocess_meshctl(b, "status")
    assert f"control plane {b.replica_id} (the leader)" in r, r


def subprocess_meshctl(r: Replica, *args: str) -> str:
    """meshctl's stdout against replica ``r`` (asserts exit 0)."""
    from tests.integration.test_control_plane import meshctl
    done = meshctl(r.cp, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---------------------------------------------------------------------- the saga
def record(p: procs.Proc, role: str, service: str, instance: str, **fields: str) -> ProcessRecord:
    """A demo state record of a process this test started (so the audit can find it)."""
    found = identity(p.pid)
    assert found is not None, f"{instance} is not running"
    return ProcessRecord(role=role, service=service, instance=instance, pid=p.pid,
                         log=str(p.log_path), cmdline=found[0], start_ticks=found[1], **fields)


def loadgen_stats(state: DemoState) -> dict[str, Any]:
    control = state.one("loadgen").control
    with urllib.request.urlopen(f"http://{control}/stats", timeout=5) as r:
        return json.load(r)


def failed_calls(stats: dict[str, Any]) -> int:
    """The load generator's failed orders: errors, orders cancelled because a step did not
    complete (not a business reason), idempotency mismatches."""
    infra = sum(n for kind, n in (stats.get("cancel_reasons") or {}).items()
                if "did not complete within" in kind)
    return sum((stats.get("errors") or {}).values()) + infra + int(stats.get("mismatches", 0))


def audit_passes(state: DemoState) -> None:
    results, _ = audit_demo(state, 30.0, say=lambda line: None)
    broken = [f"{r.name}: {list(r.problems)[:3]}" for r in results if not r.ok]
    assert not broken, broken


def wait_synced(h: Hosts, by_replica: dict[str, set[str]],
                endpoints: dict[str, set[str]], timeout_s: float = 45) -> None:
    """Every sidecar of ``by_replica[name]`` connected to that replica, SYNCED and holding
    exactly ``endpoints`` (healthy)."""
    def gaps() -> list[str]:
        out: list[str] = []
        for name, expected in by_replica.items():
            client = h.replicas[name].admin()
            try:
                sidecars, _ = client.sidecars()
                held = {s.instance: client.held_snapshot(s.instance) for s in sidecars
                        if s.instance in expected and s.connected and s.state == "SYNCED"}
            except grpc.RpcError as exc:
                out.append(f"{name}: {exc.code().name}")  # type: ignore[attr-defined]
                continue
            finally:
                client.close()
            out += sync_gaps(sidecars, expected, held, endpoints)
        return out

    last: list[str] = []

    def ready() -> bool:
        nonlocal last
        last = gaps()
        return not last

    try:
        procs.wait_for(ready, timeout_s, interval_s=0.25, what="the mesh in sync")
    except AssertionError:
        raise AssertionError(f"not in sync: {last[:6]}") from None


@pytest.mark.slow  # 18 s; the leader's takeover is also in the default suite (the test above)
@pytest.mark.timeout(120)
def test_the_saga_runs_across_two_hosts_and_survives_the_leader_killed(hosts: Hosts) -> None:
    h = hosts
    a, b = start_leader_then_follower(h)
    # The demo's authorization, applied on A, shared with B through Consul's KV.
    client = a.admin()
    try:
        client.stub.ApplyConfig(pb.ApplyConfigRequest(documents=policy_documents()), timeout=10)
        client.stub.SetAuthzDefault(pb.SetAuthzDefaultRequest(action="deny"), timeout=10)
    finally:
        client.close()
    procs.wait_for(lambda: _authz_default(b) == "deny", 15, what="B seeing the policies")

    data = h.base / "data"
    data.mkdir()

    def app(service: str, instance: str, host: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", f"demo_services.{service}", "serve", "--instance",
                instance, "--db", str(data / f"{service}.sqlite"), "--listen", f"{host}:0",
                "--control-listen", f"{host}:0", *extra]

    order_out = procs.free_port(HOST_A)
    apps = dict(zip(["order-1", "payment-a", "payment-b", "inventory-1"], h.start_all([
        app("order", "order-1", HOST_A, "--outbound", f"{HOST_A}:{order_out}",
            "--lease-s", "5"),
        app("payment", "payment-a", HOST_A), app("payment", "payment-b", HOST_B),
        app("inventory", "inventory-1", HOST_B)]), strict=True))
    for service in ("order", "payment", "inventory", "loadgen"):
        h.token_file(service)
    sides = dict(zip(["order-1", "payment-a", "loadgen-1", "payment-b", "inventory-1"],
                     h.start_all([
                         h.sidecar_cmd("order", "order-1", HOST_A,
                                       app=apps["order-1"].ready["address"],
                                       outbound_port=order_out),
                         h.sidecar_cmd("payment", "payment-a", HOST_A,
                                       app=apps["payment-a"].ready["address"]),
                         h.sidecar_cmd("loadgen", "loadgen-1", HOST_A),
                         h.sidecar_cmd("payment", "payment-b", HOST_B,
                                       app=apps["payment-b"].ready["address"]),
                         h.sidecar_cmd("inventory", "inventory-1", HOST_B,
                                       app=apps["inventory-1"].ready["address"])]),
                     strict=True))
    loadgen = h.start([sys.executable, "-m", "demo_services.loadgen", "--rps", "15",
                       "--outbound", sides["loadgen-1"].ready["outbound"],
                       "--control-listen", f"{HOST_A}:0", "--paused"])
    endpoints = {"order": {"order-1"}, "payment": {"payment-a", "payment-b"},
                 "inventory": {"inventory-1"}}
    wait_synced(h, {"a": {"order-1", "payment-a", "loadgen-1"},
                    "b": {"payment-b", "inventory-1"}}, endpoints)

    state = DemoState(dir=str(h.base), data_dir=str(data), logs_dir=str(h.base),
                      ca_dir=str(a.cp.ca_dir), control_plane={"api": a.api},
                      settings={}, started_at_unix=time.time(), complete=True)
    for inst, p in apps.items():
        service = inst.split("-")[0]
        state.processes.append(record(p, "app", service, inst, address=p.ready["address"],
                                      control=p.ready["control"],
                                      db=str(data / f"{service}.sqlite")))
    state.processes.append(record(loadgen, "loadgen", "loadgen", "loadgen-1",
                                  control=loadgen.ready["control"]))
    req = urllib.request.Request(f"http://{loadgen.ready['control']}/resume", data=b"{}",
                                 method="POST")
    urllib.request.urlopen(req, timeout=5).close()

    # The saga across the hosts: order (A) -> payment (A or B) and inventory (B).
    procs.wait_for(lambda: loadgen_stats(state)["confirmed"] >= 20, 40,
                   what="orders confirming")
    audit_passes(state)   # pauses the load, audits, resumes it
    before = loadgen_stats(state)
    assert failed_calls(before) == 0, before

    # Kill the leader (SIGKILL, by PID): no clean hand-over, Consul must drop its session.
    a.proc.kill()   # SIGKILL by its PID, then reaped
    t0 = time.monotonic()
    # A new sidecar on host B joins with A's join address first: a join tries each in turn,
    # and B answers once it leads.
    newcomer = h.start(h.sidecar_cmd("loadgen", "loadgen-2", HOST_B, join_order=("a", "b")),
                       ready_timeout_s=60)
    took_s = time.monotonic() - t0
    assert b.leads() and b.metric("mesh_cp_leader") == 1.0
    assert took_s < SESSION_TTL_S * 2 + LOCK_DELAY_S + 10, took_s
    assert b.metric('mesh_cp_certificates_issued_total{kind="join"}') == 1.0
    assert "control plane at" in newcomer.log_text()   # it was told A could not take it
    # Every sidecar now on B; renewals through B.
    wait_synced(h, {"b": {"order-1", "payment-a", "loadgen-1", "payment-b", "inventory-1",
                          "loadgen-2"}}, endpoints)
    before_renew = renewals(sides["order-1"])
    client = b.admin()
    try:
        told = client.stub.RenewCertificates(pb.RenewCertificatesRequest(service="order"),
                                             timeout=5)
        assert list(told.instances) == ["order-1"]
    finally:
        client.close()
    procs.wait_for(lambda: renewals(sides["order-1"]) > before_renew, 15,
                   what="order-1 renewed through B")
    confirmed = loadgen_stats(state)["confirmed"]
    procs.wait_for(lambda: loadgen_stats(state)["confirmed"] >= confirmed + 20, 30,
                   what="orders still confirming")
    after = loadgen_stats(state)
    assert failed_calls(after) == 0, after
    # The saga crossed the hosts: both payment replicas and host B's inventory served it.
    for inst in ("payment-a", "payment-b", "inventory-1"):
        assert served(sides[inst]) > 0, inst
    audit_passes(state)


def _authz_default(r: Replica) -> str:
    client = r.admin()
    try:
        return client.stub.GetAuthzDefault(pb.GetAuthzDefaultRequest(), timeout=5).action
    finally:
        client.close()


# ---------------------------------------------------------------------- what each host is given
def test_advertise_host_is_what_tokens_name_and_the_certificate_covers(tmp_path: Path) -> None:
    """A replica listening on an address others cannot use as such (here 127.0.0.1, for
    ``0.0.0.0`` in production) advertises ``--advertise-host``: the ready line, the tokens'
    join and API addresses name it, and the serving certificate covers it."""
    cert, key = write_ca_files(tmp_path / "ca-files")
    p = procs.start([sys.executable, "-m", "control_plane.main", "--listen", "127.0.0.1:0",
                     "--bootstrap-listen", "127.0.0.1:0", "--admin-http", "127.0.0.1:0",
                     "--otlp-listen", "", "--ca-dir", str(tmp_path / "ca"),
                     "--ca-cert", str(cert), "--ca-key", str(key),
                     "--data-dir", str(tmp_path / "data"),
                     "--advertise-host", "cp-a.mesh.test"], cwd=REPO_ROOT, log_dir=tmp_path)
    try:
        api_port = int(p.ready["listen"].rpartition(":")[2])
        assert p.ready["listen"] == f"cp-a.mesh.test:{api_port}"
        assert p.ready["bootstrap"].startswith("cp-a.mesh.test:")
        client = AdminClient(f"127.0.0.1:{api_port}", tmp_path / "ca")
        try:
            token = parse_token(client.create_token("echo", 60))
        finally:
            client.close()
        assert token.api_address == p.ready["listen"]
        assert token.join_address == p.ready["bootstrap"]
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.pem"))
        ctx.check_hostname = False
        ctx.load_cert_chain(tmp_path / "ca" / "admin.pem", tmp_path / "ca" / "admin-key.pem")
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", api_port), timeout=5) as raw, \
                ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        assert "cp-a.mesh.test" in san.get_values_for_type(x509.DNSName)
    finally:
        p.stop()


def test_a_ca_key_others_may_read_is_refused_at_start(tmp_path: Path) -> None:
    cert, key = write_ca_files(tmp_path / "ca-files")
    os.chmod(key, 0o644)
    done = subprocess.run([sys.executable, "-m", "control_plane.main", "--listen",
                           "127.0.0.1:0", "--bootstrap-listen", "127.0.0.1:0",
                           "--admin-http", "127.0.0.1:0", "--otlp-listen", "",
                           "--ca-dir", str(tmp_path / "ca"), "--ca-cert", str(cert),
                           "--ca-key", str(key), "--data-dir", str(tmp_path / "data")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "mode 0644" in errors[0] and "chmod 600" in errors[0], errors
    assert not (tmp_path / "ca").exists()


# ---------------------------------------------------------------------- the election alone
async def test_consul_leadership_hands_over_and_a_leader_cut_off_steps_down(
        tmp_path: Path) -> None:
    """Two ``ConsulLeadership`` in-process on the stand-in: one leads, the other knows it; a
    clean stop hands over at once; a leader that cannot reach Consul for longer than its
    session's TTL stops leading (its clock is moved on instead of waiting 10 s)."""
    (tmp_path / "consul").mkdir()
    standin = StandIn.start(tmp_path / "consul")
    target = target_from_env(standin.url, {"CONSUL_HTTP_TOKEN": standin.token})
    prefix = f"el{uuid.uuid4().hex[:8]}"
    skew = {"b": 0.0}
    a = ConsulLeadership(target, prefix, "cp-a", lock_delay_s=0.5, request_timeout_s=1)
    b = ConsulLeadership(target, prefix, "cp-b", lock_delay_s=0.5, request_timeout_s=1,
                         max_backoff_s=0.5, clock=lambda: time.monotonic() + skew["b"])
    try:
        await a.start("127.0.0.2:1", "127.0.0.2:2")
        await eventually(a.is_leader, 10, "a leading")
        await b.start("127.0.0.3:1", "127.0.0.3:2")
        await eventually(lambda: (b.leader() or LeaderInfo("", "", "", "")).replica == "cp-a",
                         10, "b knowing a leads")
        assert not b.is_leader()
        info = b.leader()
        assert info is not None and info.join_address == "127.0.0.2:1" and \
            info.api_address == "127.0.0.2:2" and info.since > 0
        await a.stop()
        assert not a.is_leader() and a.leader() is None   # a stopping replica signs no more
        t0 = time.monotonic()
        await eventually(b.is_leader, 5, "b leading after a stopped")
        assert time.monotonic() - t0 < 3   # released: no lock-delay, no TTL to wait out
        assert (b.leader() or LeaderInfo("", "", "", "")).replica == "cp-b"
        # Consul goes away; once the TTL has passed without a renewal, b no longer leads.
        standin.proc.stop()
        assert b.is_leader()
        skew["b"] = SESSION_TTL_S
        assert not b.is_leader() and b.leader() is None
    finally:
        await a.stop()
        await b.stop()
        standin.proc.stop()
