"""The control plane at scale: a real control plane, N simulated sidecars in another process.

``run`` starts a real control plane (``python -m control_plane.main``: its own CA and data dir
under the run's working directory, every listener on port 0, default timers: push window
100 ms) and the simulator (``python -m bench.cp_sim``: one process, one TLS connection and one
discovery stream per simulated sidecar, each with its own workload certificate obtained by a
real join: token, CSR, certificate). The N instances are spread over 50 services (service
``svc-007`` has instances ``svc-007-00007``, ``svc-007-00057``, ...), each registers an
inbound address, so the one snapshot every sidecar gets has a cluster per service and N
endpoints. Then it measures:

* ``cp_registrations_per_s``: N divided by the time from the first ``Register`` handed to grpc
  to the moment the last subscriber's first ``Ack`` (of whatever snapshot it got first) was
  handed to grpc (the simulator's clock). All N streams are opened at once, as after a control-plane
  restart; the time includes the TLS handshakes, and every snapshot the control plane
  publishes meanwhile (one per push window while instances keep arriving) goes to every
  subscriber connected by then;
* ``cp_rss_mb_1000_sidecars`` (MB, VmRSS) and ``cp_cpu_pct_idle_1000_sidecars`` (utime+stime
  over a quiet 5 s window with every subscriber connected and in sync, as % of one core; the
  simulated sidecars send no state reports, see ``cp_sim``);
* per config change (a ``TrafficPolicy`` applied through ``Admin.ApplyConfig``, as ``meshctl
  apply`` does; the snapshot is one document every sidecar gets, so each change reaches every
  subscriber), per subscriber, the time from the start of the apply call to the moment the
  control plane had that subscriber's ``Ack`` of the new version, in the control plane's own
  view: ``Admin.ListSidecars`` shows the version each sidecar ACKed and when the control plane
  last heard from it (``last_seen_unix``, and a simulated sidecar sends nothing but ACKs), on
  the wall clock both processes share. ``cp_push_p50_ms_1000_sidecars`` and
  ``cp_push_p99_ms_1000_sidecars`` are over every (change, subscriber) pair. The simulator's
  own times (push read, ACK handed to grpc; CLOCK_MONOTONIC) are logged beside them;
* ``cp_cpu_ms_per_change_1000_sidecars``: the control plane's utime+stime from just before
  the apply call until the simulator had sent every ACK of the change, mean per change
  (ms): the apply (validation, storage, snapshot build), N pushes and N ACKs.

Every subscriber must ACK every change, or the run fails naming how many did not; a stream
that fails after the subscribers settled fails the run too (during the registration storm the
simulated sidecars reconnect like real ones, and the failures are logged). The keys keep their
``_1000_sidecars`` names whatever N is (the smoke test runs 20).
``python -m bench.cp_scale [--sidecars N] [--changes K] [--keep-dir]`` prints them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from bench import procstat
from bench.h2load import percentile
from bench.procs import BenchError, Proc, ProcGroup
from mesh_common.cli_args import OneLineArgumentParser
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from tests.support.sidecar import REPO_ROOT

KEYS = ("cp_registrations_per_s", "cp_rss_mb_1000_sidecars", "cp_cpu_pct_idle_1000_sidecars",
        "cp_push_p50_ms_1000_sidecars", "cp_push_p99_ms_1000_sidecars",
        "cp_cpu_ms_per_change_1000_sidecars")
"""The figures ``run`` returns."""
SERVICES = 50
"""The simulated sidecars are spread over this many services (fewer when N is smaller)."""
TRUST_DOMAIN = "mesh.local"
IDLE_WINDOW_S = 5.0
JOIN_CONCURRENCY = 8
"""Joins in flight at once (the simulator's joins share one connection to the join listener,
which takes 8 streams per connection)."""
UP_TIMEOUT_S = 90.0
ACK_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 60.0
RPC_TIMEOUT_S = 30.0


def service_name(i: int) -> str:
    return f"svc-{i:03d}"


def _env(root: Path = REPO_ROOT) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(root),
                                                        os.environ.get("PYTHONPATH")]))}


class SimClient:
    """The simulator's control socket (JSON lines; one reply per command)."""

    def __init__(self, proc: Proc) -> None:
        host, _, port = str(proc.ready["control"]).rpartition(":")
        self.proc = proc
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.file = self.sock.makefile("rwb")

    def call(self, cmd: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send ``cmd``; its reply. BenchError when the simulator fails, says not ok, or does
        not answer within ``timeout_s`` (+ 10 s)."""
        self.sock.settimeout(timeout_s + 10)
        try:
            self.file.write(json.dumps(cmd).encode() + b"\n")
            self.file.flush()
            line = self.file.readline()
        except OSError as exc:
            raise BenchError(self.proc.describe_failure(
                f"no answer to {cmd['cmd']!r} ({exc})")) from None
        if not line:
            raise BenchError(self.proc.describe_failure(f"closed its control socket on "
                                                        f"{cmd['cmd']!r}"))
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise BenchError(f"simulated sidecars: {reply.get('error')}; "
                             f"errors: {reply.get('errors')}")
        return reply

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


class Admin:
    """meshctl's admin identity on the control plane's API (mTLS). A failed call raises
    BenchError naming the RPC, its status and the control plane's state and stderr tail."""

    def __init__(self, cp: Proc, ca_dir: Path) -> None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=(ca_dir / "ca.pem").read_bytes(),
            private_key=(ca_dir / "admin-key.pem").read_bytes(),
            certificate_chain=(ca_dir / "admin.pem").read_bytes())
        self.cp = cp
        self.channel = grpc.secure_channel(cp.ready["listen"], creds, options=[
            ("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb_grpc.AdminStub(self.channel)

    def _call(self, name: str, request: Any) -> Any:
        try:
            return getattr(self.stub, name)(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise BenchError(self.cp.describe_failure(
                f"Admin.{name} failed: {exc.code().name}: {exc.details()}")) from None

    def token(self, service: str) -> str:
        resp = self._call("CreateToken", pb.CreateTokenRequest(service=service, ttl_s=3600))
        return str(resp.token)

    def sidecars(self) -> pb.ListSidecarsResponse:
        resp: pb.ListSidecarsResponse = self._call("ListSidecars", pb.ListSidecarsRequest())
        return resp

    def apply(self, doc: dict[str, Any]) -> str:
        """Apply one document (as ``meshctl apply`` does); the snapshot version it made."""
        resp = self._call("ApplyConfig", pb.ApplyConfigRequest(documents=[pb.ConfigDocument(
            source="cp-bench", index=1, json=json.dumps(doc))]))
        return str(resp.version)

    def close(self) -> None:
        self.channel.close()


def change_doc(k: int) -> dict[str, Any]:
    """The ``k``-th config change: a TrafficPolicy (timeout and retries) for svc-000 whose
    timeout differs every time, so every apply changes the one snapshot everybody gets."""
    return {"kind": "TrafficPolicy", "name": "cp-bench",
            "spec": {"service": service_name(0), "timeout_ms": 1000 + k,
                     "retries": {"max_attempts": 2 + k % 2, "retry_on": ["UNAVAILABLE"]}}}


def _synced(admin: Admin, version: str) -> tuple[list[pb.SidecarStatus], str]:
    """The sidecars the control plane shows connected with ``version`` ACKed, and its latest
    version."""
    resp = admin.sidecars()
    return ([s for s in resp.sidecars if s.connected and s.acked_version == version],
            resp.latest_version)


def _cp_view(admin: Admin, n: int, version: str, what: str) -> list[pb.SidecarStatus]:
    """The ``n`` sidecars' status once the control plane shows each of them connected with
    ``version`` ACKed (asked every 50 ms, at most ``ACK_TIMEOUT_S``); BenchError naming how
    many it lacks."""
    deadline = time.monotonic() + ACK_TIMEOUT_S
    while True:
        done, _ = _synced(admin, version)
        if len(done) == n:
            return done
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: the control plane shows {n - len(done)} of {n} "
                             f"simulated sidecars without an ACK of version {version}")
        time.sleep(0.05)


def _settle(admin: Admin, sim: SimClient, n: int, log: Callable[[str], None]) -> str:
    """Wait until the control plane's latest version is stable and every subscriber ACKed it
    (the last registrations publish a few more versions after the first ACKs); returns it."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        version = admin.sidecars().latest_version
        reply = sim.call({"cmd": "acks", "version": version, "timeout_s": ACK_TIMEOUT_S},
                         ACK_TIMEOUT_S)
        if reply["missing"]:
            raise BenchError(f"{reply['missing']} of {n} simulated sidecars never ACKed version "
                             f"{version} (e.g. {reply['missing_ids']}; stream failures: "
                             f"{reply['errors']})")
        time.sleep(0.3)  # a push window (100 ms) and then some: anything pending is out
        done, latest = _synced(admin, version)
        if latest == version and len(done) == n:
            log(f"settled on version {version}: the control plane shows all {n} ACKed")
            return version
    raise BenchError(f"the control plane did not settle within {SETTLE_TIMEOUT_S:g} s")


def _ms(values: list[float]) -> str:
    """p50 / p99 / max of ascending ``values`` (ms), for the log."""
    return (f"p50 {percentile(values, 50):.0f} / p99 {percentile(values, 99):.0f} / max "
            f"{values[-1]:.0f} ms")


def run(workdir: Path, group: ProcGroup, *, sidecars: int = 1000, changes: int = 5,
        log: Callable[[str], None], cp_root: Path | None = None) -> dict[str, float]:
    """Measure the control plane with ``sidecars`` simulated sidecars and ``changes`` config
    changes; returns ``KEYS`` as floats (per second, MB, % of one core, ms). Processes are
    started in ``group`` and stopped before returning (also on failure). Raises BenchError
    for any failure (a process that died, a refused call, a subscriber that never ACKed).
    ``cp_root`` (development, A/B): run the control plane from that source tree instead."""
    if sidecars < 1 or changes < 1:
        raise BenchError("need at least one sidecar and one change")
    base = workdir / "cp-scale"
    base.mkdir(parents=True, exist_ok=True)
    ca_dir, data_dir = base / "ca", base / "data"
    root = cp_root or REPO_ROOT
    started = time.monotonic()
    mine: list[Proc] = []
    admin: Admin | None = None
    sim: SimClient | None = None
    try:
        cp = group.start_ready_line("cp-scale-control-plane", [
            sys.executable, "-m", "control_plane.main", "--listen", "127.0.0.1:0",
            "--bootstrap-listen", "127.0.0.1:0", "--admin-http", "127.0.0.1:0",
            "--otlp-listen", "127.0.0.1:0", "--ca-dir", str(ca_dir), "--data-dir",
            str(data_dir), "--trust-domain", TRUST_DOMAIN], env=_env(root), cwd=root,
            timeout_s=60)
        mine.append(cp)
        admin = Admin(cp, ca_dir)
        n_services = min(SERVICES, sidecars)
        services = [service_name(i) for i in range(n_services)]
        tokens = {s: admin.token(s) for s in services}
        instances = [[services[i % n_services], f"{services[i % n_services]}-{i:05d}"]
                     for i in range(sidecars)]
        simp = group.start_ready_line("cp-scale-simulator", [
            sys.executable, "-m", "bench.cp_sim"], env=_env(), cwd=REPO_ROOT, timeout_s=60)
        mine.append(simp)
        sim = SimClient(simp)

        # ---- join (one certificate per simulated sidecar), then every stream at once
        reply = sim.call({"cmd": "join", "tokens": tokens, "instances": instances,
                          "trust_domain": TRUST_DOMAIN, "concurrency": JOIN_CONCURRENCY,
                          "timeout_s": 120}, 120)
        log(f"control plane: {sidecars} simulated sidecars of {n_services} services joined "
            f"(one certificate each) in {reply['seconds']:.1f} s "
            f"({sidecars / reply['seconds']:.0f} joins/s)")
        cpu0, scpu0 = procstat.cpu_seconds(cp.pid), procstat.cpu_seconds(simp.pid)
        reply = sim.call({"cmd": "up", "timeout_s": UP_TIMEOUT_S}, UP_TIMEOUT_S)
        group.check_alive()
        if reply["failed"]:
            raise BenchError(f"{reply['failed']} of {sidecars} simulated sidecars never ACKed a "
                             f"first snapshot within {UP_TIMEOUT_S:g} s; stream failures: "
                             f"{reply['errors']}")
        up_s = reply["last_first_ack_at"] - reply["first_register_at"]
        registrations_per_s = sidecars / up_s
        log(f"control plane: {sidecars} registrations, first Register to last first ACK "
            f"{up_s:.2f} s = {registrations_per_s:.0f}/s (CPU: control plane "
            f"{procstat.cpu_seconds(cp.pid) - cpu0:.1f} s, simulator "
            f"{procstat.cpu_seconds(simp.pid) - scpu0:.1f} s; streams that failed and "
            f"reconnected: {reply['stream_failures']} {reply['errors'] or ''})")
        previous = _settle(admin, sim, sidecars, log)
        status = sim.call({"cmd": "status"}, 10)
        failures_settled = status["stream_failures"]
        log(f"control plane: snapshot {status['snapshot_bytes'] / 1024:.0f} KiB; "
            f"{status['snapshots']} pushes received so far "
            f"({status['bytes_received'] / 2**20:.0f} MiB)")

        # ---- idle: every subscriber connected and in sync
        time.sleep(1.0)
        c0, s0, t0 = procstat.cpu_seconds(cp.pid), procstat.cpu_seconds(simp.pid), \
            time.monotonic()
        time.sleep(IDLE_WINDOW_S)
        c1, s1, t1 = procstat.cpu_seconds(cp.pid), procstat.cpu_seconds(simp.pid), \
            time.monotonic()
        idle_pct = (c1 - c0) / (t1 - t0) * 100
        rss = procstat.rss_mb(cp.pid)
        log(f"control plane with {sidecars} connected: RSS {rss:.0f} MB, CPU {idle_pct:.1f}% "
            f"of a core over {t1 - t0:.1f} s idle (simulator {(s1 - s0) / (t1 - t0) * 100:.1f}%,"
            f" RSS {procstat.rss_mb(simp.pid):.0f} MB)")

        # ---- config changes
        latencies_ms: list[float] = []
        cpu_ms: list[float] = []
        for k in range(1, changes + 1):
            c0, s0 = procstat.cpu_seconds(cp.pid), procstat.cpu_seconds(simp.pid)
            t0_wall, t0 = time.time(), time.monotonic()
            version = admin.apply(change_doc(k))
            applied_ms = (time.monotonic() - t0) * 1000
            if version == previous:
                raise BenchError(f"change {k} left the snapshot at version {version}: the "
                                 "apply changed nothing")
            previous = version
            reply = sim.call({"cmd": "acks", "version": version, "timeout_s": ACK_TIMEOUT_S},
                             ACK_TIMEOUT_S)
            c1, s1 = procstat.cpu_seconds(cp.pid), procstat.cpu_seconds(simp.pid)
            what = f"change {k} (version {version})"
            if reply["missing"]:
                raise BenchError(f"{what}: {reply['missing']} of {sidecars} simulated sidecars "
                                 f"did not ACK it within {ACK_TIMEOUT_S:g} s (e.g. "
                                 f"{reply['missing_ids']}; stream failures: {reply['errors']})")
            if reply["stream_failures"] != failures_settled:
                raise BenchError(f"{what}: {reply['stream_failures'] - failures_settled} "
                                 f"discovery stream(s) failed during the measurement: "
                                 f"{reply['errors']}")
            cp_ms = sorted((s.last_seen_unix - t0_wall) * 1000
                           for s in _cp_view(admin, sidecars, version, what))
            if cp_ms[0] < 0:
                raise BenchError(f"{what}: the control plane heard an ACK of it "
                                 f"{-cp_ms[0]:.0f} ms before the apply began (the wall clock "
                                 "stepped?)")
            sim_ms = sorted((a - t0) * 1000 for a in reply["ack_at"])
            recv_ms = sorted((r - t0) * 1000 for r in reply["recv_at"])
            latencies_ms += cp_ms
            cpu_ms.append((c1 - c0) * 1000)
            log(f"change {k} -> version {version}: apply answered in {applied_ms:.0f} ms; "
                f"ACK at the control plane {_ms(cp_ms)} (simulator: push read "
                f"{_ms(recv_ms)}, ACK sent {_ms(sim_ms)}); CPU: control plane "
                f"{cpu_ms[-1]:.0f} ms, simulator {(s1 - s0) * 1000:.0f} ms")
            time.sleep(0.5)
        group.check_alive()
        latencies_ms.sort()
        figures = {
            "cp_registrations_per_s": registrations_per_s,
            "cp_rss_mb_1000_sidecars": rss,
            "cp_cpu_pct_idle_1000_sidecars": idle_pct,
            "cp_push_p50_ms_1000_sidecars": percentile(latencies_ms, 50),
            "cp_push_p99_ms_1000_sidecars": percentile(latencies_ms, 99),
            "cp_cpu_ms_per_change_1000_sidecars": sum(cpu_ms) / len(cpu_ms),
        }
        bad = [k for k, v in figures.items() if not math.isfinite(v)]
        if bad:
            raise BenchError(f"control plane figures not finite: {', '.join(bad)}")
        sim.call({"cmd": "stop"}, 30)
        log(f"control plane part: {changes} changes x {sidecars} ACKs, took "
            f"{time.monotonic() - started:.0f} s")
        return {k: float(v) for k, v in figures.items()}
    finally:
        if sim is not None:
            sim.close()
        if admin is not None:
            admin.close()
        for p in reversed(mine):
            p.stop()


def main(argv: list[str] | None = None) -> int:
    ap = OneLineArgumentParser(prog="python -m bench.cp_scale",
                               description=__doc__.splitlines()[0])
    ap.add_argument("--sidecars", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=5)
    ap.add_argument("--keep-dir", action="store_true")
    ap.add_argument("--cp-root", type=Path, default=None,
                    help="run the control plane from this source tree (A/B comparisons)")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mesh-cp-bench-"))
    group = ProcGroup(log_dir=workdir)

    def log(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    try:
        figures = run(workdir, group, sidecars=args.sidecars, changes=args.changes, log=log,
                      cp_root=args.cp_root)
        for k in KEYS:
            print(f"{k:40s} {figures[k]:10.1f}")
        return 0
    except BenchError as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        group.stop_all()
        if args.keep_dir:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
