"""The "mesh-all" path: a real control plane and dynamic sidecars with every default layer on.

Processes (all on 127.0.0.1, started and stopped by PID through the run's ``ProcGroup``):

* the control plane (``python -m control_plane.main``, its CA and data dirs under the bench's
  workdir, every listener on port 0, its embedded OTLP receiver on);
* sidecar ``echo`` (``--service echo --app <backend>``) and sidecar ``client`` (outbound only),
  both dynamic: they join with a join token made through the Admin API, take their identity
  and their snapshot from the control plane, and export spans to its OTLP receiver at the
  sidecar's default ``--trace-sample-rate`` (0.1).

The mesh config goes through the real Admin API (``Admin.ApplyConfig``, ``SetAuthzDefault``),
as ``meshctl apply`` sends it: a Route with a rule on the method (``/meshtest.Echo/`` prefix),
a TrafficPolicy (peak-EWMA, a 10 s timeout, retries with a budget, outlier detection) and an
AuthorizationPolicy allowing only ``client`` to call ``echo`` under the mesh-wide default
``deny`` (the demo's model). ``check_layers_acted`` then proves from the sidecars' ``/stats``
(and the control plane's trace store) that the layers did act; the run fails if one did not.

``register_endpoints`` adds 99 real registrations (``bench.registrar``: joined identities,
discovery streams, Register + ACK) so the client's snapshot knows 100 endpoints.

The control plane and the sidecars log warnings only; ``BENCH_CP_LOG_LEVEL`` and
``BENCH_SIDECAR_LOG_LEVEL`` (e.g. ``info``, with ``--keep-dir``) say more when debugging.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench import grpc_client
from bench.paths import MESH_AUTHORITY, BenchPath
from bench.procs import BenchError, Proc, ProcGroup
from demo_services.launcher.admin import AdminClient
from protos.mesh.v1 import control_pb2 as pb
from tests.support.sidecar import REPO_ROOT

TRUST_DOMAIN = "mesh.local"
ECHO_METHODS = "/meshtest.Echo/"
ROUTE_RULE = "echo-grpc"
AUTHZ_POLICY = "echo-callers"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/service/client"
RPC_TIMEOUT_S = 10.0
SYNC_TIMEOUT_S = 30.0
TOKEN_TTL_S = 3600
TIMEOUT_MS = 10_000
"""The route timeout: long enough for the 64 MiB streaming call under load."""
SAMPLING_CALLS = 200
"""grpcio calls sent after start so that spans exist at sample rate 0.1 (P(none) < 1e-9)."""

Doc = dict[str, Any]


# ---------------------------------------------------------------------- the mesh config
def route_doc(on: bool = True) -> Doc:
    """Route ``echo``: one rule matching the method prefix (on), or no rules (off)."""
    spec: dict[str, Any] = {"service": MESH_AUTHORITY}
    if on:
        spec["rules"] = [{"name": ROUTE_RULE, "match": {"method": {"prefix": ECHO_METHODS}},
                          "destinations": [{"weight": 100}]}]
    return {"kind": "Route", "name": MESH_AUTHORITY, "spec": spec}


def policy_doc(*, timeout: bool = True, retries: bool = True, outlier: bool = True,
               peak_ewma: bool = True) -> Doc:
    """TrafficPolicy ``echo`` with each setting on (the all-layers values) or off:
    timeout 10 s / none; retries up to 3 attempts on UNAVAILABLE within a budget of 20% +
    10/s / ``max_attempts: 1``; outlier detection after 5 sick answers in a row / off
    (``consecutive_errors: 0``, no success-rate rule); ``peak_ewma`` / ``round_robin``."""
    spec: dict[str, Any] = {"service": MESH_AUTHORITY,
                            "load_balancer": "peak_ewma" if peak_ewma else "round_robin"}
    if timeout:
        spec["timeout_ms"] = TIMEOUT_MS
    spec["retries"] = ({"max_attempts": 3, "retry_on": ["UNAVAILABLE"], "backoff_base_ms": 25,
                        "backoff_max_ms": 250, "budget_percent": 20, "budget_min_per_s": 10,
                        "budget_window_s": 10} if retries else {"max_attempts": 1})
    spec["outlier_detection"] = ({"consecutive_errors": 5, "base_ejection_ms": 30_000,
                                  "max_ejection_percent": 50, "half_open_probes": 1}
                                 if outlier else {"consecutive_errors": 0,
                                                  "success_rate_min_requests": 0})
    return {"kind": "TrafficPolicy", "name": MESH_AUTHORITY, "spec": spec}


def authz_doc() -> Doc:
    """AuthorizationPolicy ``echo-callers``: ALLOW ``client`` on ``/meshtest.Echo/*``."""
    return {"kind": "AuthorizationPolicy", "name": AUTHZ_POLICY,
            "spec": {"service": MESH_AUTHORITY,
                     "rules": [{"action": "ALLOW", "sources": [CLIENT_ID],
                                "methods": [f"{ECHO_METHODS}*"]}]}}


@dataclass(frozen=True)
class MeshConfig:
    """One state of the mesh config: documents to apply, objects (kind, name) that must not
    exist, and the authorization default (``allow``/``deny``)."""

    apply: tuple[Doc, ...]
    absent: tuple[tuple[str, str], ...] = ()
    authz_default: str = "deny"


ALL_ON = MeshConfig((route_doc(), policy_doc(), authz_doc()))
"""Every layer on: what the mesh-all path is measured with."""


# ---------------------------------------------------------------------- control plane API
class Admin:
    """The control plane's Admin API over mTLS with meshctl's admin credentials (from the
    CA dir the control plane wrote), as ``meshctl`` calls it."""

    def __init__(self, api: str, ca_dir: Path) -> None:
        self._client = AdminClient(api, ca_dir)  # the demo's channel, as meshctl's identity
        self.stub = self._client.stub

    def close(self) -> None:
        self._client.close()

    def _call(self, what: str, fn: Callable[..., Any], request: Any) -> Any:
        try:
            return fn(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else "?"
            details = e.details() if isinstance(e, grpc.Call) else str(e)
            raise BenchError(f"control plane: {what} failed: {code}: {details}") from None

    def create_token(self, service: str) -> str:
        """A reusable join token for ``service`` (valid one hour)."""
        resp = self._call(f"CreateToken {service}", self.stub.CreateToken,
                          pb.CreateTokenRequest(service=service, ttl_s=TOKEN_TTL_S))
        return str(resp.token)

    def apply(self, docs: Iterable[Doc]) -> str:
        """ApplyConfig of ``docs`` (JSON, as meshctl sends them); returns the snapshot version."""
        documents = [pb.ConfigDocument(source="bench", index=i + 1, json=json.dumps(d))
                     for i, d in enumerate(docs)]
        resp = self._call("ApplyConfig", self.stub.ApplyConfig,
                          pb.ApplyConfigRequest(documents=documents))
        return str(resp.version)

    def delete(self, kind: str, name: str) -> None:
        """DeleteConfig of one object; nothing when it does not exist."""
        try:
            self.stub.DeleteConfig(pb.DeleteConfigRequest(kind=kind, name=name),
                                   timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.NOT_FOUND:
                return
            code = e.code() if isinstance(e, grpc.Call) else "?"
            raise BenchError(f"control plane: DeleteConfig {kind} {name} failed: {code}") from None

    def set_authz_default(self, action: str) -> None:
        self._call(f"SetAuthzDefault {action}", self.stub.SetAuthzDefault,
                   pb.SetAuthzDefaultRequest(action=action))

    def sidecars(self) -> tuple[list[Any], str]:
        """(every registered instance's status, the latest snapshot version)."""
        resp = self._call("ListSidecars", self.stub.ListSidecars, pb.ListSidecarsRequest())
        return list(resp.sidecars), str(resp.latest_version)

    def held_snapshot(self, instance: str) -> dict[str, Any]:
        """The snapshot document sidecar ``instance`` holds (asked over its stream)."""
        resp = self._call(f"GetSidecarConfig {instance}", self.stub.GetSidecarConfig,
                          pb.GetSidecarConfigRequest(instance=instance))
        doc = json.loads(resp.json).get("snapshot") or {}
        return doc if isinstance(doc, dict) else {}

    def trace_count(self) -> int:
        """Traces the control plane's OTLP receiver keeps."""
        resp = self._call("ListTraces", self.stub.ListTraces, pb.ListTracesRequest())
        return len(resp.traces)

    def set_config(self, cfg: MeshConfig) -> None:
        """Make ``cfg`` the mesh config: default first when it opens up (allow), documents,
        deletions, default last when it closes (deny), so no snapshot in between denies the
        client. Returns once the control plane took every change (not yet the sidecars:
        ``wait_synced``)."""
        if cfg.authz_default == "allow":
            self.set_authz_default("allow")
        if cfg.apply:
            self.apply(cfg.apply)
        for kind, name in cfg.absent:
            self.delete(kind, name)
        if cfg.authz_default != "allow":
            self.set_authz_default(cfg.authz_default)

    def wait_synced(self, instances: Iterable[str], timeout_s: float = SYNC_TIMEOUT_S,
                    ready: Callable[[Mapping[str, Any]], str | None] | None = None) -> str:
        """Wait until every one of ``instances`` is connected and has ACKed the latest
        snapshot version (and ``ready(statuses by instance)`` names nothing missing);
        returns that version. BenchError naming what is missing after ``timeout_s``."""
        wanted = sorted(instances)
        deadline = time.monotonic() + timeout_s
        while True:
            statuses, latest = self.sidecars()
            by = {s.instance: s for s in statuses}
            gaps = []
            for inst in wanted:
                s = by.get(inst)
                if s is None:
                    gaps.append(f"{inst}: not registered")
                elif not s.connected:
                    gaps.append(f"{inst}: not connected")
                elif s.acked_version != latest:
                    gaps.append(f"{inst}: acked {s.acked_version or '-'} of {latest} "
                                f"({s.state}{', NACK: ' + s.nack_reason if s.nack_reason else ''})")
            if not gaps and ready is not None and (why := ready(by)):
                gaps.append(why)
            if not gaps and latest:
                return latest
            if time.monotonic() > deadline:
                raise BenchError(f"control plane: sidecars not synced after {timeout_s:g} s: "
                                 + "; ".join(gaps or ["no snapshot version yet"]))
            time.sleep(0.05)


# ---------------------------------------------------------------------- processes
def _repo_env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


@dataclass
class ControlPlane:
    """The started control plane: its process, addresses (HOST:PORT) and CA dir."""

    proc: Proc
    api: str
    bootstrap: str
    otlp: str
    ca_dir: Path


def start_control_plane(group: ProcGroup, workdir: Path) -> ControlPlane:
    """``python -m control_plane.main`` with its CA and data dirs under ``workdir``, every
    listener (API, join, admin HTTP, OTLP) on a free port of 127.0.0.1."""
    ca_dir, data_dir = workdir / "ca", workdir / "data"
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "control_plane.main", "--listen", "127.0.0.1:0",
           "--bootstrap-listen", "127.0.0.1:0", "--admin-http", "127.0.0.1:0",
           "--otlp-listen", "127.0.0.1:0", "--ca-dir", str(ca_dir), "--data-dir", str(data_dir),
           "--log-level", os.environ.get("BENCH_CP_LOG_LEVEL", "warning")]
    proc = group.start_ready_line("control-plane", cmd, env=_repo_env(), cwd=REPO_ROOT)
    ready = proc.ready
    if not ready.get("otlp"):
        raise BenchError(proc.describe_failure("started without its OTLP receiver"))
    return ControlPlane(proc, ready["listen"], ready["bootstrap"], ready["otlp"], ca_dir)


def write_secret(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by its owner only (a join token)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


def dynamic_sidecar_cmd(service: str, instance: str, token_file: Path, *,
                        app: str | None = None, extra: Iterable[str] = ()) -> list[str]:
    """``mesh-sidecar`` in dynamic mode, every port chosen by the kernel, defaults otherwise
    (trace sample rate, health and report intervals), warnings only in its log."""
    cmd = [sys.executable, "-m", "sidecar.main", "--service", service, "--instance-id", instance,
           "--token-file", str(token_file), "--inbound-port", "0", "--outbound-port", "0",
           "--admin-port", "0", "--log-level", os.environ.get("BENCH_SIDECAR_LOG_LEVEL", "warning"), *extra]
    if app is not None:
        cmd += ["--app", app]
    return cmd


def start_ready_lines(group: ProcGroup, cmds: Mapping[str, list[str]],
                      timeout_s: float = 30) -> dict[str, Proc]:
    """Start every command of ``cmds`` (name -> argv) at once and wait for all their ready
    lines (at most ``timeout_s`` seconds), as ``ProcGroup.start_ready_line`` does one by one.
    Spawned from this thread: a child gets SIGTERM when the thread that started it ends
    (``bench.procs`` sets PR_SET_PDEATHSIG), so worker threads only read."""
    procs = {name: group._spawn(name, cmd, _repo_env(), REPO_ROOT) for name, cmd in cmds.items()}
    firsts: dict[str, bytes] = {}
    done = threading.Semaphore(0)

    def read(proc: Proc) -> None:
        assert proc.popen.stdout is not None
        firsts[proc.name] = proc.popen.stdout.readline()
        done.release()
        for _ in proc.popen.stdout:  # keep draining: the child must never block on stdout
            pass

    for proc in procs.values():
        threading.Thread(target=read, args=(proc,), daemon=True, name=f"stdout-{proc.name}").start()
    deadline = time.monotonic() + timeout_s
    for _ in procs:
        if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
            late = next(p for n, p in procs.items() if n not in firsts)
            raise BenchError(late.describe_failure(f"no ready line after {timeout_s} s"))
    for proc in procs.values():
        text = firsts[proc.name].decode(errors="replace").strip()
        try:
            proc.ready = json.loads(text)["ready"]
        except (json.JSONDecodeError, KeyError, TypeError):
            time.sleep(0.2)  # let the log catch up with the exit
            raise BenchError(proc.describe_failure(f"first stdout line is not a ready line: {text!r}"))
    return procs


def admin_get(address: str, path: str) -> dict[str, Any]:
    """GET http://ADDRESS/PATH of a sidecar's admin port as JSON; BenchError when it fails."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as r:
            doc = json.load(r)
    except (OSError, urllib.error.URLError, ValueError) as e:
        raise BenchError(f"sidecar admin {address}{path}: {e}") from None
    if not isinstance(doc, dict):
        raise BenchError(f"sidecar admin {address}{path}: not a JSON object")
    return doc


@dataclass
class MeshAll:
    """The running mesh-all: its measured ``path`` (client sidecar -> echo sidecar), the
    control plane and its Admin client, and each sidecar instance's process."""

    path: BenchPath
    cp: ControlPlane
    admin: Admin
    sidecars: dict[str, Proc] = field(default_factory=dict)  # instance -> process
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def instances(self) -> list[str]:
        return sorted(self.sidecars)

    def admin_address(self, instance: str) -> str:
        return str(self.sidecars[instance].ready["admin"])

    def stats(self, instance: str) -> dict[str, Any]:
        return admin_get(self.admin_address(instance), "/stats")

    def wait_exported(self, timeout_s: float = 15.0, poll_s: float = 0.25) -> None:
        """Wait until the traced sidecars (client and echo) exported (or dropped, counted)
        every span they made: the export thread sends them up to ``--trace-export-delay-ms``
        (1 s) after the call. Polls their ``/stats`` every ``poll_s`` (about 0.8 ms of the
        sidecar's CPU each). BenchError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        for inst in (CLIENT, ECHO):
            while True:
                t = self.stats(inst).get("tracing", {})
                pending = int(t.get("spans_submitted", 0)) - int(t.get("spans_exported", 0)) \
                    - int(t.get("spans_dropped", 0)) - int(t.get("spans_dropped_queue_full", 0))
                if pending <= 0:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"mesh-all: {inst} still has {pending} spans to export "
                                     f"after {timeout_s:g} s: {t}")
                time.sleep(poll_s)

    def set_config(self, cfg: MeshConfig) -> str:
        """Apply ``cfg`` and wait until every sidecar ACKed it; returns the version."""
        self.admin.set_config(cfg)
        return self.admin.wait_synced(self.instances)

    def close(self) -> None:
        self.admin.close()


CLIENT, ECHO = "client-1", "echo-1"


def start_mesh_all(group: ProcGroup, workdir: Path, backend: Proc,
                   log: Callable[[str], None]) -> MeshAll:
    """Start the control plane, apply the all-layers config, start the two dynamic
    sidecars, wait until each ACKed the snapshot that has echo SERVING, and
    check that the layers act (``check_layers_acted``). BenchError on any failure."""
    started = time.monotonic()
    cp = start_control_plane(group, workdir / "control-plane")
    admin = Admin(cp.api, cp.ca_dir)
    try:
        admin.set_config(ALL_ON)
        tokens = {svc: write_secret(workdir / f"{svc}.token", admin.create_token(svc))
                  for svc in ("echo", "client")}
        backend_addr = f"127.0.0.1:{backend.ready['port']}"
        specs = {
            ECHO: dynamic_sidecar_cmd("echo", ECHO, tokens["echo"], app=backend_addr),
            CLIENT: dynamic_sidecar_cmd("client", CLIENT, tokens["client"]),
        }
        started_procs = start_ready_lines(group, {f"sidecar-all-{inst}": cmd
                                                  for inst, cmd in specs.items()})
        sidecars = {inst: started_procs[f"sidecar-all-{inst}"] for inst in specs}

        def echo_serving(by: Mapping[str, Any]) -> str | None:
            s = by.get(ECHO)
            if s is None or s.health != "SERVING":
                return f"{ECHO}: app health {getattr(s, 'health', '-') or '-'}, not SERVING yet"
            # The registry may be ahead of the latest snapshot: look at what the client holds.
            held = admin.held_snapshot(CLIENT)
            healthy = [e for c in held.get("clusters", []) if c.get("name") == MESH_AUTHORITY
                       for e in c.get("endpoints", []) if e.get("healthy")]
            return None if healthy else f"{CLIENT}: no healthy endpoint of echo in its snapshot yet"

        version = admin.wait_synced(sidecars, ready=echo_serving)
        client, echo = sidecars[CLIENT], sidecars[ECHO]
        port = int(client.ready["outbound"].rpartition(":")[2])
        procs = [backend, cp.proc, echo, client]
        mesh = MeshAll(
            path=BenchPath(name="mesh-all", port=port, authority=MESH_AUTHORITY,
                           proxies={"sidecar-client": client.pid, "sidecar-echo": echo.pid},
                           procs=procs),
            cp=cp, admin=admin, sidecars=sidecars)
        mesh.path.settle = mesh.wait_exported
        log(f"mesh-all: control plane and 2 dynamic sidecars synced on snapshot {version} "
            f"in {time.monotonic() - started:.1f} s")
        check_layers_acted(mesh, log)
        return mesh
    except BaseException:
        admin.close()
        raise


# ---------------------------------------------------------------------- proof of work
def _route_matches(stats: Mapping[str, Any]) -> int:
    rules = stats.get("outbound", {}).get("routing", {}).get("routes", {}) \
        .get(MESH_AUTHORITY, {}).get("rules", {})
    return int(rules.get(ROUTE_RULE, {}).get("matches", 0))


def _authz_allowed(stats: Mapping[str, Any]) -> int:
    decisions = stats.get("inbound", {}).get("authz", {}).get("decisions", [])
    return sum(int(d.get("count", 0)) for d in decisions
               if d.get("decision") == "allow" and d.get("policy") == AUTHZ_POLICY
               and d.get("mode") == "enforce")


def _spans_exported(stats: Mapping[str, Any]) -> int:
    return int(stats.get("tracing", {}).get("spans_exported", 0))


def check_layers_acted(mesh: MeshAll, log: Callable[[str], None],
                       timeout_s: float = 15.0) -> dict[str, Any]:
    """Send ``SAMPLING_CALLS`` grpcio unary calls through the path, then wait (at most
    ``timeout_s``) until the sidecars' ``/stats`` show every layer at work: the route rule
    matched, the retry budget of echo exists and holds retries, the balancer and outlier
    detection know echo's endpoint (peak-EWMA named in the snapshot the client holds, with
    the 10 s timeout), the echo sidecar allowed calls by the policy ``echo-callers`` under the
    default deny, and both sidecars exported spans that the control plane's receiver keeps.
    Returns that evidence (also kept in ``mesh.evidence``); BenchError naming what did not
    act."""
    try:
        grpc_client.verify(mesh.path, unary_calls=SAMPLING_CALLS, stream_calls=0)
    except BenchError as e:
        raise mesh.path.explain(e)
    deadline = time.monotonic() + timeout_s
    while True:
        client, echo = mesh.stats(CLIENT), mesh.stats(ECHO)
        held = mesh.admin.held_snapshot(CLIENT)
        route = next((r for r in held.get("routes", []) if r.get("service") == MESH_AUTHORITY), {})
        retries = client.get("outbound", {}).get("routing", {}).get("retries", {}) \
            .get(MESH_AUTHORITY, {})
        breakers = client.get("outbound", {}).get("breakers", {}).get(MESH_AUTHORITY, {})
        evidence = {
            "route_rule_matches": _route_matches(client),
            "retry_budget_available": retries.get("budget_available"),
            "load_balancer": route.get("load_balancer"),
            "timeout_ms": route.get("timeout_ms"),
            "retry_max_attempts": route.get("retries", {}).get("max_attempts"),
            "outlier_consecutive_errors": route.get("outlier_detection", {})
            .get("consecutive_errors"),
            "outlier_endpoints": len(breakers),
            "authz_default": echo.get("inbound", {}).get("authz", {}).get("default"),
            "authz_allowed_by_policy": _authz_allowed(echo),
            "spans_exported_client": _spans_exported(client),
            "spans_exported_echo": _spans_exported(echo),
            "trace_sample_rate": client.get("tracing", {}).get("sample_rate"),
            "traces_at_control_plane": mesh.admin.trace_count(),
        }
        missing = []
        if evidence["route_rule_matches"] < SAMPLING_CALLS:
            missing.append(f"route rule {ROUTE_RULE} matched {evidence['route_rule_matches']} calls")
        if not isinstance(evidence["retry_budget_available"], int | float) \
                or evidence["retry_budget_available"] <= 0:
            missing.append(f"retry budget of echo: {evidence['retry_budget_available']}")
        if evidence["load_balancer"] != "peak_ewma" or evidence["timeout_ms"] != TIMEOUT_MS \
                or evidence["retry_max_attempts"] != 3 \
                or evidence["outlier_consecutive_errors"] != 5:
            missing.append(f"the client's snapshot: route {route}")
        if evidence["outlier_endpoints"] < 1:
            missing.append("outlier detection knows no endpoint of echo")
        if evidence["authz_default"] != "deny" or \
                evidence["authz_allowed_by_policy"] < SAMPLING_CALLS:
            missing.append(f"authorization: default {evidence['authz_default']}, "
                           f"{evidence['authz_allowed_by_policy']} calls allowed by {AUTHZ_POLICY}")
        if evidence["spans_exported_client"] < 1 or evidence["spans_exported_echo"] < 1 \
                or evidence["traces_at_control_plane"] < 1:
            missing.append(f"tracing: {evidence['spans_exported_client']} spans exported by the "
                           f"client, {evidence['spans_exported_echo']} by echo, "
                           f"{evidence['traces_at_control_plane']} traces at the control plane")
        if not missing:
            mesh.evidence = evidence
            log("mesh-all layers at work: " + ", ".join(f"{k} {v}" for k, v in evidence.items()))
            return evidence
        if time.monotonic() > deadline:
            raise mesh.path.explain(BenchError(
                "mesh-all: a layer did not act after " f"{SAMPLING_CALLS} calls: " + "; ".join(missing)))
        time.sleep(0.2)


# ---------------------------------------------------------------------- 100 endpoints
IDLE_SERVICES = 9
"""The extra instances are spread over this many services nobody calls (``idle-01``...)."""


def register_endpoints(group: ProcGroup, mesh: MeshAll, workdir: Path, total: int = 100,
                       log: Callable[[str], None] = print) -> int:
    """Register ``total`` minus the endpoints the client's snapshot already has (echo's one)
    through the control plane (``bench.registrar``: joined identities, discovery streams),
    spread evenly over ``IDLE_SERVICES`` services that are never called, and wait until every
    sidecar ACKed the snapshot carrying them and the client holds exactly ``total`` endpoints.
    Returns how many instances it registered; BenchError otherwise."""
    have = _endpoint_count(mesh.admin.held_snapshot(CLIENT))
    extra = total - have
    if extra <= 0 or extra % IDLE_SERVICES:
        raise BenchError(f"cannot spread {extra} extra endpoints over {IDLE_SERVICES} services")
    services = [f"idle-{i:02d}" for i in range(1, IDLE_SERVICES + 1)]
    tokens = {svc: mesh.admin.create_token(svc) for svc in services}
    tokens_file = write_secret(workdir / "idle-tokens.json", json.dumps(tokens))
    started = time.monotonic()
    reg = group.start_ready_line(
        "registrar", [sys.executable, "-m", "bench.registrar", "--tokens", str(tokens_file),
                      "--per-service", str(extra // IDLE_SERVICES)],
        env=_repo_env(), cwd=REPO_ROOT, timeout_s=60)
    mesh.path.procs.append(reg)

    def client_knows_all(_: Mapping[str, Any]) -> str | None:
        n = _endpoint_count(mesh.admin.held_snapshot(CLIENT))
        return None if n == total else f"{CLIENT} holds {n} endpoints, not {total}"

    version = mesh.admin.wait_synced(mesh.instances, ready=client_knows_all)
    log(f"registered {extra} more instances ({IDLE_SERVICES} idle services) in "
        f"{time.monotonic() - started:.1f} s: {CLIENT} holds {total} endpoints (snapshot {version})")
    return extra


def _endpoint_count(snapshot: Mapping[str, Any]) -> int:
    return sum(len(c.get("endpoints", [])) for c in snapshot.get("clusters", []))


def rss_with_endpoints(group: ProcGroup, mesh: MeshAll, workdir: Path, body: Path,
                       response_bytes: int, *, requests: int, clients: int, streams: int,
                       total: int = 100, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The client sidecar's RSS (MB) while its snapshot knows ``total`` endpoints, loaded:
    ``register_endpoints``, then one h2load run of ``requests`` through the mesh-all path
    (so the calls run on the new snapshot), then ``VmRSS``. Returns ``{"rss_mb",
    "rss_mb_before", "endpoints", "requests", "registered", "idle_services",
    "instances_per_service"}``;
    BenchError on a failed request or registration."""
    from bench import h2load
    from bench.procstat import rss_mb

    pid = mesh.sidecars[CLIENT].pid
    before = rss_mb(pid)
    extra = register_endpoints(group, mesh, workdir, total, log)
    path = mesh.path
    try:
        result = h2load.run(path.url(h2load.UNARY_PATH), body, requests=requests, clients=clients,
                            streams=streams, authority=path.authority,
                            timeout_s=30 + requests / 200)
        h2load.check_complete(result, requests, response_bytes,
                              f"mesh-all path with {total} endpoints known")
        path.check_alive()
    except BenchError as e:
        raise path.explain(e)
    rss = rss_mb(pid)
    log(f"client sidecar RSS with {total} endpoints known, after {requests} calls: "
        f"{rss:.1f} MB (before the registrations: {before:.1f} MB)")
    return {"rss_mb": rss, "rss_mb_before": before, "endpoints": total, "requests": requests,
            "registered": extra, "idle_services": IDLE_SERVICES,
            "instances_per_service": extra // IDLE_SERVICES}
