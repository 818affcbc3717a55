"""Bringing the demo mesh up and down.

``bring_up``: the control plane, a join token per service (files under ``<dir>/tokens``,
mode 0600), the demo's authorization (the mesh default set to deny and the
AuthorizationPolicy documents of ``demo_services/policies/`` applied, before any sidecar
joins: loadgen may call order, order may call payment and inventory, nothing else), two
replicas each of inventory, payment and order with their dynamic sidecars,
the load generator (paused) and the API gateway (on ``MESH_DEMO_GATEWAY``, its demo token
key under ``<dir>/gateway``), each with its outbound-only sidecar; then it waits until every
sidecar is SYNCED and holds both replicas of each service, healthy, and resumes the load.
``state.json`` is rewritten after each start, so whatever was started can be taken down even
if ``up`` fails or is interrupted (it takes down what it started itself before it raises).

``bring_down``: stops every process in ``state.json`` by pid, load first and the control
plane last (the load and the gateway first), then removes the file. Safe to run twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

import grpc
import yaml

from demo_services.gateway.keys import demo_keys
from protos.mesh.v1 import control_pb2 as pb

from . import procs
from .admin import AdminClient, sync_gaps
from .settings import GATEWAY, LOADGEN, REPLICAS, SERVICES, Settings
from .state import DemoState, ProcessRecord, StateError, load, save

TOKEN_TTL_S = 7 * 24 * 3600
SYNC_POLL_S = 0.25
TRACE_EXPORT_DELAY_MS = 500
"""Sidecars send their spans at least this often: a trace shows in ``meshctl traces`` soon."""
POLICIES_DIR = Path(__file__).resolve().parent.parent / "policies"
"""The demo's AuthorizationPolicy documents (``*.yaml``), applied by ``bring_up``."""
AUTHZ_DEFAULT = "deny"
"""The mesh-wide authorization default the demo sets: only what a policy allows."""
POLICY_RPC_TIMEOUT_S = 10.0
GATEWAY_CONFIG = Path(__file__).resolve().parent.parent / "gateway" / "gateway.yaml"
"""The demo gateway's config (routes, the demo's token issuer, 20 rps burst 40 a subject)."""
Log = Callable[[str], None]


class AlreadyRunning(Exception):
    """A demo is running (or starting) under this directory (one line)."""


@dataclass
class Started:
    """What ``bring_up`` started: the state written to state.json and the Popen objects
    (pid -> Popen) of the processes, for a launcher that stays to reap them."""

    state: DemoState
    children: dict[int, Popen[bytes]] = field(default_factory=dict)


def instance_ids(service: str) -> list[str]:
    return [f"{service}-{i}" for i in range(1, REPLICAS + 1)]


def running(settings: Settings) -> DemoState | None:
    """The state of a demo with at least one of its processes still alive, else None."""
    try:
        st = load(settings.state_path)
    except StateError:
        return None
    return st if any(procs.is_ours(p) for p in st.processes) else None


@contextmanager
def _lock(settings: Settings) -> Iterator[None]:
    settings.dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(settings.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(f"another 'demo up' is starting under {settings.dir}") from None
        yield
    finally:
        os.close(fd)


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def policy_documents(directory: Path = POLICIES_DIR) -> list[pb.ConfigDocument]:
    """Every YAML document of the ``*.yaml`` files of ``directory`` (by file name), as the
    Admin API's ``ConfigDocument`` (source: the file, index: from 1). Raises OSError or
    yaml.YAMLError for an unreadable or invalid file."""
    out: list[pb.ConfigDocument] = []
    for path in sorted(directory.glob("*.yaml")):
        for index, body in enumerate(yaml.safe_load_all(path.read_text()), start=1):
            if body is not None:
                out.append(pb.ConfigDocument(source=str(path), index=index,
                                             json=json.dumps(body)))
    return out


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


class _Launch:
    """One bring-up: starts processes, records them, cleans up on failure."""

    def __init__(self, settings: Settings, log: Log) -> None:
        self.s = settings
        self.log = log
        self.deadline = time.monotonic() + settings.ready_timeout_s
        self.state = DemoState(
            dir=str(settings.dir), data_dir=str(settings.data_dir),
            logs_dir=str(settings.logs_dir), ca_dir=str(settings.ca_dir),
            control_plane={"api": settings.api, "bootstrap": settings.bootstrap,
                           "data_dir": str(settings.control_plane_data_dir),
                           "ca_dir": str(settings.ca_dir)},
            settings={"rps": settings.rps, "lease_s": settings.lease_s,
                      "report_interval_s": settings.report_interval_s,
                      "health_interval_s": settings.health_interval_s,
                      "grace_period_s": settings.grace_period_s,
                      "replicas": REPLICAS},
            started_at_unix=time.time())
        self.children: dict[int, Popen[bytes]] = {}
        self.tokens: dict[str, Path] = {}

    # -- starting ----------------------------------------------------------------------
    def spawn(self, name: str, cmd: list[str], role: str, service: str, instance: str,
              env: dict[str, str] | None = None) -> tuple[procs.Spawned, ProcessRecord]:
        sp = procs.spawn(name, cmd, self.s.logs_dir / f"{name}.log", env)
        self.children[sp.pid] = sp.popen
        rec = procs.record_for(sp, role, service, instance)
        self.state.processes.append(rec)
        save(self.state, self.s.state_path)
        return sp, rec

    def start_control_plane(self) -> str:
        cmd = _py("-m", "control_plane.main", "--listen", self.s.api,
                  "--bootstrap-listen", self.s.bootstrap, "--ca-dir", str(self.s.ca_dir),
                  "--data-dir", str(self.s.control_plane_data_dir),
                  "--grace-period-s", f"{self.s.grace_period_s:g}",
                  "--report-window-s", f"{self.s.report_window_s:g}",
                  "--admin-http", self.s.admin_http, "--otlp-listen", self.s.otlp)
        sp, rec = self.spawn("control-plane", cmd, "control-plane", "", "")
        ready = procs.wait_ready([sp], self.deadline)[sp.name]
        rec.address = ready["listen"]
        self.state.control_plane["admin_http"] = ready.get("admin_http", "")
        self.state.control_plane["otlp"] = ready.get("otlp", "")
        save(self.state, self.s.state_path)
        return ready["listen"]

    def make_tokens(self, api: str) -> None:
        self.s.tokens_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.s.tokens_dir, 0o700)
        client = AdminClient(api, self.s.ca_dir)
        try:
            for service in (*SERVICES, LOADGEN, GATEWAY):
                path = self.s.tokens_dir / f"{service}.token"
                _write_secret(path, client.create_token(service, TOKEN_TTL_S) + "\n")
                self.tokens[service] = path
        finally:
            client.close()

    def apply_authz(self, api: str) -> None:
        """Set the mesh's authorization default to ``AUTHZ_DEFAULT`` and apply the demo's
        policies (kept by the control plane across restarts; unchanged on a second up)."""
        docs = policy_documents()
        client = AdminClient(api, self.s.ca_dir)
        try:
            if docs:
                client.stub.ApplyConfig(pb.ApplyConfigRequest(documents=docs),
                                        timeout=POLICY_RPC_TIMEOUT_S)
            client.stub.SetAuthzDefault(pb.SetAuthzDefaultRequest(action=AUTHZ_DEFAULT),
                                        timeout=POLICY_RPC_TIMEOUT_S)
        finally:
            client.close()
        self.log(f"authorization: default {AUTHZ_DEFAULT}, {len(docs)} policies applied "
                 f"({POLICIES_DIR.name}/)")

    def app_cmd(self, service: str, instance: str, outbound: str) -> list[str]:
        cmd = _py("-m", f"demo_services.{service}", "serve", "--instance", instance,
                  "--db", str(self.s.db_path(service)), "--listen", "127.0.0.1:0",
                  "--control-listen", "127.0.0.1:0")
        if service == "order":
            cmd += ["--outbound", outbound, "--lease-s", f"{self.s.lease_s:g}"]
        return cmd

    def sidecar_cmd(self, service: str, instance: str, app: str | None,
                    outbound_port: int = 0) -> list[str]:
        cmd = _py("-m", "sidecar.main", "--service", service, "--instance-id", instance,
                  "--token-file", str(self.tokens[service]), "--label", "version=v1",
                  "--inbound-port", "0", "--outbound-port", str(outbound_port),
                  "--admin-port", "0",
                  "--report-interval-s", f"{self.s.report_interval_s:g}",
                  "--health-interval-s", f"{self.s.health_interval_s:g}",
                  # A sidecar must be back within the registry's grace period after a control
                  # plane restart, or the restarted control plane drops its instance (and a
                  # snapshot goes out without it): reconnect backoff at most half the grace.
                  "--max-backoff-s", f"{max(0.05, min(5.0, self.s.grace_period_s / 2)):g}",
                  "--drain-timeout-s", f"{self.s.drain_timeout_s:g}",
                  "--ewma-decay-s", f"{self.s.ewma_decay_s:g}",
                  "--trace-sample-rate", f"{self.s.trace_sample_rate:g}",
                  "--trace-export-delay-ms", str(TRACE_EXPORT_DELAY_MS),
                  "--access-log", str(self.s.logs_dir / f"{instance}.access.jsonl"))
        if app:
            cmd += ["--app", app]
        return cmd

    def start_everything(self) -> None:
        self.s.data_dir.mkdir(parents=True, exist_ok=True)
        order_ids = instance_ids("order")
        *ports, gw_port = procs.free_ports(len(order_ids) + 1)
        order_out = dict(zip(order_ids, ports, strict=True))
        # Apps first (their ports come from their ready lines), with the load generator's
        # outbound-only sidecar, all at once.
        apps: dict[str, tuple[procs.Spawned, ProcessRecord]] = {}
        for service in SERVICES:
            for inst in instance_ids(service):
                out = f"127.0.0.1:{order_out[inst]}" if service == "order" else ""
                apps[inst] = self.spawn(inst, self.app_cmd(service, inst, out), "app",
                                        service, inst)
        lg_inst = f"{LOADGEN}-1"
        lg_side = self.spawn(f"{lg_inst}.sidecar", self.sidecar_cmd(LOADGEN, lg_inst, None),
                             "sidecar", LOADGEN, lg_inst)
        gw_inst = f"{GATEWAY}-1"
        # A fixed outbound port (as order's): a restarted sidecar is where the gateway calls.
        gw_side = self.spawn(f"{gw_inst}.sidecar",
                             self.sidecar_cmd(GATEWAY, gw_inst, None, gw_port),
                             "sidecar", GATEWAY, gw_inst)
        ready = procs.wait_ready([sp for sp, _ in (*apps.values(), lg_side, gw_side)],
                                 self.deadline)
        for sp, rec in apps.values():
            rec.address, rec.control = ready[sp.name]["address"], ready[sp.name]["control"]
            rec.db = str(self.s.db_path(rec.service))
        self._set_sidecar_ports(lg_side[1], ready[lg_side[0].name])
        self._set_sidecar_ports(gw_side[1], ready[gw_side[0].name])
        save(self.state, self.s.state_path)

        # Then each app's sidecar, and the load generator (paused until the mesh is synced).
        sides: list[tuple[procs.Spawned, ProcessRecord]] = []
        for inst, (_, app) in apps.items():
            sides.append(self.spawn(f"{inst}.sidecar",
                                    self.sidecar_cmd(app.service, inst, app.address,
                                                     order_out.get(inst, 0)),
                                    "sidecar", app.service, inst))
        gw = self.spawn(gw_inst, self.gateway_cmd(gw_side[1].outbound), "gateway", GATEWAY,
                        gw_inst, env={"MESH_DEMO_DIR": str(self.s.dir)})
        gw_ready = procs.wait_ready([gw[0]], self.deadline)[gw[0].name]
        gw[1].address, gw[1].outbound = gw_ready["listen"], gw_side[1].outbound
        save(self.state, self.s.state_path)
        lg_cmd = _py("-m", "demo_services.loadgen", "--rps", f"{self.s.rps:g}",
                     "--outbound", lg_side[1].outbound, "--control-listen", "127.0.0.1:0",
                     "--paused")
        if self.s.via_gateway:
            lg_cmd += ["--via-gateway", gw_ready["url"],
                       "--gateway-key-dir", str(self.s.gateway_key_dir)]
        lg = self.spawn(lg_inst, lg_cmd, "loadgen", LOADGEN, lg_inst)
        ready = procs.wait_ready([sp for sp, _ in (*sides, lg)], self.deadline)
        for sp, rec in sides:
            self._set_sidecar_ports(rec, ready[sp.name])
        lg[1].control = ready[lg[0].name]["control"]
        lg[1].outbound = lg_side[1].outbound
        save(self.state, self.s.state_path)

    def gateway_cmd(self, outbound: str) -> list[str]:
        """The API gateway on ``settings.gateway`` through its sidecar's ``outbound`` port,
        with the demo's config; the demo's token key is made first (the config names it)."""
        demo_keys(self.s.gateway_key_dir)
        return _py("-m", "demo_services.gateway", "serve", "--config", str(GATEWAY_CONFIG),
                   "--listen", self.s.gateway, "--outbound", outbound)

    @staticmethod
    def _set_sidecar_ports(rec: ProcessRecord, ready: dict[str, str]) -> None:
        rec.inbound = ready.get("inbound") or ""
        rec.outbound = ready.get("outbound") or ""
        rec.admin = ready.get("admin") or ""

    def wait_synced(self, api: str) -> None:
        expected = {r.instance for r in self.state.find("sidecar")}
        endpoints = {svc: set(instance_ids(svc)) for svc in SERVICES}
        client = AdminClient(api, self.s.ca_dir)
        gaps = ["not asked yet"]
        try:
            while True:
                try:
                    sidecars, _ = client.sidecars()
                    held = {}
                    for s in sidecars:
                        if s.instance in expected and s.state == "SYNCED" and s.connected:
                            held[s.instance] = client.held_snapshot(s.instance)
                    gaps = sync_gaps(sidecars, expected, held, endpoints)
                except grpc.RpcError as exc:
                    gaps = [f"control plane: {exc.code().name}"]  # type: ignore[attr-defined]
                if not gaps:
                    return
                self._check_alive()
                if time.monotonic() >= self.deadline:
                    more = f" (+{len(gaps) - 3} more)" if len(gaps) > 3 else ""
                    raise procs.LaunchError(
                        f"the mesh did not sync within {self.s.ready_timeout_s:g}s: "
                        f"{'; '.join(gaps[:3])}{more}")
                time.sleep(SYNC_POLL_S)
        finally:
            client.close()

    def _check_alive(self) -> None:
        for rec in self.state.processes:
            popen = self.children.get(rec.pid)
            if popen is not None and popen.poll() is not None:
                raise procs.LaunchError(f"{rec.instance or rec.role} ({rec.role}) exited with "
                                        f"{popen.returncode} (log {rec.log})")

    def resume_load(self) -> None:
        lg = self.state.one("loadgen")
        req = urllib.request.Request(f"http://{lg.control}/resume", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5):
            pass

    def run(self) -> Started:
        t0 = time.monotonic()
        api = self.start_control_plane()
        self.log(f"control plane ready at {api} (CA dir {self.s.ca_dir})")
        self.make_tokens(api)
        self.apply_authz(api)
        self.start_everything()
        self.log(f"{len(self.state.processes)} processes started; waiting for every sidecar "
                 f"to sync")
        self.wait_synced(api)
        self.resume_load()
        self.state.complete = True
        save(self.state, self.s.state_path)
        self.log(f"mesh ready in {time.monotonic() - t0:.1f}s; state in {self.s.state_path}")
        return Started(self.state, self.children)


def bring_up(settings: Settings, log: Log) -> Started:
    """Start the whole demo and return once it is ready (see the module doc).

    Raises AlreadyRunning if a demo under ``settings.dir`` has live processes or another
    ``up`` holds the lock; LaunchError (after stopping what it started and removing
    state.json) if a process fails or the mesh is not ready within the ready timeout;
    KeyboardInterrupt the same way."""
    with _lock(settings):
        other = running(settings)
        if other is not None:
            alive = sum(procs.is_ours(p) for p in other.processes)
            raise AlreadyRunning(f"a demo is already running under {settings.dir} ({alive} "
                                 f"processes, state {settings.state_path}); stop it with "
                                 f"'make demo-down'")
        settings.state_path.unlink(missing_ok=True)   # a stale one: nothing of it is alive
        launch = _Launch(settings, log)
        try:
            return launch.run()
        except BaseException:
            stop_all(launch.state, settings.stop_timeout_s, launch.children)
            settings.state_path.unlink(missing_ok=True)
            raise


def stop_groups(state: DemoState) -> list[list[ProcessRecord]]:
    """The processes in the order they stop: the load and the gateway (what sends requests
    in), order apps (their sagas still reach payment and inventory), the other apps, the
    sidecars, the control plane."""
    groups = [state.find("loadgen") + state.find("gateway"), state.find("app", "order"),
              [p for p in state.find("app") if p.service != "order"], state.find("sidecar"),
              state.find("control-plane")]
    grouped = {id(p) for g in groups for p in g}
    rest = [p for p in state.processes if id(p) not in grouped]
    return [g for g in (*groups[:-1], rest, groups[-1]) if g]


def stop_all(state: DemoState, timeout_s: float,
             children: dict[int, Popen[bytes]] | None = None) -> list[str]:
    """Stop every process of ``state`` group by group; returns the notes of procs.stop."""
    notes: list[str] = []
    for group in stop_groups(state):
        notes += procs.stop(group, timeout_s, children)
    return notes


def bring_down(settings: Settings, log: Log,
               children: dict[int, Popen[bytes]] | None = None) -> list[str]:
    """Stop the demo of state.json (only its pids, only while they are still the processes
    started) and remove the file. Returns the notes (processes that had to be killed); a
    missing state.json is "not running", not an error."""
    try:
        st = load(settings.state_path)
    except StateError as exc:
        log(f"nothing to stop: {exc}")
        return []
    alive = [p for p in st.processes if procs.is_ours(p)]
    notes = stop_all(st, settings.stop_timeout_s, children)
    settings.state_path.unlink(missing_ok=True)
    log(f"stopped {len(alive)} processes" + (f" ({len(notes)} killed)" if notes else ""))
    return notes
