"""The running demo as chaos drives it, the way a user would: ``.mesh/state.json`` for the
processes and their control endpoints, the control plane's Admin API with meshctl's
credentials, the apps' and the load generator's HTTP control endpoints, signals by pid, and
the launcher's own commands to start a process again.

Nothing here decides what a scenario expects; it acts and reads.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from demo_services import check
from demo_services.audit import Invariant
from demo_services.launcher import procs
from demo_services.launcher.admin import AdminClient
from demo_services.launcher.settings import Settings
from demo_services.launcher.state import DemoState, ProcessRecord, load, save
from protos.mesh.v1 import control_pb2 as pb

HTTP_TIMEOUT_S = 5.0
POLL_S = 0.2


class ChaosError(Exception):
    """Chaos cannot act on the demo (one line): no demo, a process that will not start."""


def wait_for(predicate: Callable[[], Any], timeout_s: float, poll_s: float = POLL_S) -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout_s`` passes
    (returns the last falsy value). Exceptions from the predicate count as falsy."""
    deadline = time.monotonic() + timeout_s
    value: Any = None
    while True:
        try:
            value = predicate()
        except (grpc.RpcError, OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            return value
        time.sleep(poll_s)


def _http(address: str, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else (b"" if method != "GET" else None)
    req = urllib.request.Request(f"http://{address}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


@dataclass
class TapRecorder:
    """Calls seen by one ``Admin.Tap`` stream, recorded by a background thread."""

    events: list[pb.TapEvent] = field(default_factory=list)
    error: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def since(self, t_unix: float) -> list[pb.TapEvent]:
        with self._lock:
            return [e for e in self.events if e.time_unix >= t_unix]

    def add(self, ev: pb.TapEvent) -> None:
        with self._lock:
            self.events.append(ev)


class Mesh:
    """A handle on the demo under ``settings`` (its state.json re-read by ``reload``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        try:
            self.state: DemoState = load(settings.state_path)
        except Exception as exc:
            raise ChaosError(f"no running demo under {settings.dir}: {exc}") from None
        self.admin = AdminClient(self.state.control_plane["api"], settings.ca_dir)
        self._restarts = 0

    def close(self) -> None:
        self.admin.close()

    def reload(self) -> None:
        self.state = load(self.settings.state_path)

    def save(self) -> None:
        save(self.state, self.settings.state_path)

    # ------------------------------------------------------------------ processes
    def app(self, instance: str) -> ProcessRecord:
        return self.state.one("app", instance=instance)

    def sidecar(self, instance: str) -> ProcessRecord:
        return self.state.one("sidecar", instance=instance)

    def control_plane(self) -> ProcessRecord:
        return self.state.one("control-plane")

    def instances(self, service: str) -> list[str]:
        return sorted(p.instance for p in self.state.find("app", service))

    def alive(self, rec: ProcessRecord) -> bool:
        return procs.is_ours(rec)

    def kill(self, rec: ProcessRecord, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process of ``rec`` (only if it is still the one started)."""
        if procs.is_ours(rec):
            os.kill(rec.pid, sig)

    def wait_gone(self, rec: ProcessRecord, timeout_s: float = 10.0) -> bool:
        return bool(wait_for(lambda: not procs.is_ours(rec), timeout_s))

    def restart(self, rec: ProcessRecord, timeout_s: float = 30.0,
                replace: dict[str, str] | None = None) -> ProcessRecord:
        """Start ``rec``'s command line again (its flags' values in ``replace`` swapped,
        e.g. ``{"--listen": "127.0.0.1:P"}``), wait for its ready line, record it in
        state.json in place of ``rec`` and return the new record. An app keeps its address
        and control endpoint (so its sidecar still reaches it); a sidecar gets new inbound
        and admin ports (its outbound port is fixed by the command line)."""
        cmd = list(rec.cmdline)
        fixed = dict(replace or {})
        if rec.role == "app":
            fixed.setdefault("--listen", rec.address)
            fixed.setdefault("--control-listen", rec.control)
        for flag, value in fixed.items():
            if flag in cmd:
                cmd[cmd.index(flag) + 1] = value
        self._restarts += 1
        name = rec.instance or rec.role
        log = Path(rec.log).with_name(f"{name}.restart{self._restarts}.log")
        sp = procs.spawn(name, cmd, log)
        deadline = time.monotonic() + timeout_s
        try:
            ready = procs.wait_ready([sp], deadline)[sp.name]
        except procs.LaunchError as exc:
            raise ChaosError(f"{name} did not start again: {str(exc).splitlines()[0]}") from None
        new = procs.record_for(sp, rec.role, rec.service, rec.instance, address=rec.address,
                               control=rec.control, db=rec.db)
        if rec.role == "sidecar":
            new.inbound = ready.get("inbound") or ""
            new.outbound = ready.get("outbound") or ""
            new.admin = ready.get("admin") or ""
        elif rec.role == "control-plane":
            new.address = ready.get("listen") or rec.address
        self.state.processes = [new if p is rec or p.pid == rec.pid else p
                                for p in self.state.processes]
        self.save()
        return new

    # ------------------------------------------------------------------ apps and load
    def sicken(self, instance: str, **sickness: Any) -> None:
        """Make replica ``instance`` sick (``latency_ms``, ``error_rate``, ``error_code``)."""
        _http(self.app(instance).control, "POST", "/sickness", sickness)

    def heal(self, instance: str) -> None:
        _http(self.app(instance).control, "DELETE", "/sickness")

    def load_stats(self) -> dict[str, Any]:
        """The load generator's counts (``sent``, ``confirmed``, ``cancelled``, ``pending``,
        ``in_flight``, ``errors`` by code, ``rps``, ...)."""
        return _http(self.state.one("loadgen").control, "GET", "/stats")

    def pause_load(self) -> None:
        _http(self.state.one("loadgen").control, "POST", "/pause", {})

    def resume_load(self) -> None:
        _http(self.state.one("loadgen").control, "POST", "/resume", {})

    def load_errors(self) -> int:
        """Calls the load generator saw fail (any gRPC error) since it started."""
        return sum(self.load_stats().get("errors", {}).values())

    # ------------------------------------------------------------------ control plane
    def sidecars(self) -> list[pb.SidecarStatus]:
        return self.admin.sidecars()[0]

    def all_synced(self) -> bool:
        """Every sidecar of state.json connected and SYNCED."""
        expected = {p.instance for p in self.state.find("sidecar")}
        got = {s.instance: s for s in self.sidecars()}
        return all(i in got and got[i].connected and got[i].state == "SYNCED"
                   for i in expected)

    def breakers(self, service: str = "") -> list[pb.BreakerEndpoint]:
        resp = self.admin.stub.ListBreakers(pb.ListBreakersRequest(service=service),
                                            timeout=5)
        return list(resp.endpoints)

    def topology(self) -> pb.TopologyResponse:
        return self.admin.topology()

    def renew(self, service: str = "") -> int:
        """Ask the connected sidecars (of ``service``) to renew their certificates now;
        returns how many were asked."""
        resp = self.admin.stub.RenewCertificates(pb.RenewCertificatesRequest(service=service),
                                                 timeout=10)
        return len(resp.instances)

    def certificates(self) -> list[Any]:
        return list(self.admin.stub.ListCertificates(pb.ListCertificatesRequest(),
                                                     timeout=5).certificates)

    @contextmanager
    def tap(self, service: str, method: str = "", duration_s: float = 600) -> Iterator[TapRecorder]:
        """Record the calls ``service``'s sidecars carry (and its callers' calls to it)
        while the block runs (a background ``Admin.Tap`` stream, cancelled at the end)."""
        rec = TapRecorder()
        stream = self.admin.stub.Tap(pb.TapRequest(service=service, method=method,
                                                   duration_s=duration_s),
                                     timeout=duration_s + 10)

        def pump() -> None:
            try:
                for ev in stream:
                    rec.add(ev)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                    rec.error = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
        thread = threading.Thread(target=pump, name=f"tap-{service}", daemon=True)
        thread.start()
        try:
            yield rec
        finally:
            stream.cancel()
            thread.join(timeout=5)

    # ------------------------------------------------------------------ sidecars' admin ports
    def sidecar_stats(self, instance: str) -> dict[str, Any]:
        """Sidecar ``instance``'s admin ``GET /stats`` (discovery, identity, listeners, ...)."""
        return _http(self.sidecar(instance).admin, "GET", "/stats")

    def sidecar_metrics(self, instance: str) -> list[tuple[str, dict[str, str], float]]:
        """The samples of sidecar ``instance``'s ``GET /metrics`` as (name, labels, value)."""
        from prometheus_client.parser import text_string_to_metric_families
        url = f"http://{self.sidecar(instance).admin}/metrics"
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as r:
            text = r.read().decode()
        return [(s.name, dict(s.labels), float(s.value))
                for fam in text_string_to_metric_families(text) for s in fam.samples]

    # ------------------------------------------------------------------ invariants
    def audit(self, wait_s: float = 30.0,
              say: Callable[[str], None] | None = None) -> list[Invariant]:
        """``demo_services.check``'s audit of the running demo (pauses the load while it
        looks, then resumes it). Raises ChaosError when it cannot audit."""
        try:
            results, _ = check.audit_demo(self.state, wait_s, say or (lambda _line: None))
        except check.CheckError as exc:
            raise ChaosError(f"cannot audit the demo: {exc}") from None
        return results


def http_json(address: str, method: str, path: str, body: Any = None) -> Any:
    """A JSON request to an HTTP control endpoint (raises OSError/urllib errors)."""
    return _http(address, method, path, body)


__all__ = ["ChaosError", "Mesh", "TapRecorder", "http_json", "wait_for"]
