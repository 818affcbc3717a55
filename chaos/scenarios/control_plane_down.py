"""``control-plane-down``: stop the control plane (SIGTERM) for longer than the registry's
grace period while the saga runs, then start it again.

What must hold (DESIGN: "losing the control plane loses no request"): the data plane keeps
serving on its last snapshots, so no order fails (the load generator's errors and its
cancellations for infrastructure reasons do not grow) and orders keep confirming; every
sidecar keeps the snapshot it had; once the control plane is back (same addresses, same CA
and data dir), every sidecar resyncs within a bound and the registry holds every instance
again, each sidecar holding every replica as a healthy endpoint.

Everything is read as a user would: the load generator's ``/stats``, each sidecar's admin
``/stats``, the Admin API (``ListSidecars``, ``GetSidecarConfig``).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from chaos.mesh import ChaosError, Mesh, wait_for
from chaos.scenarios import Options
from chaos.timeline import Timeline
from demo_services.launcher.admin import sync_gaps

NAME = "control-plane-down"
EXPECTATION = ("with the control plane stopped for longer than the registry's grace period, "
               "traffic keeps flowing on the last snapshots with no failed order; restarted, "
               "every sidecar is SYNCED again within a bound and the registry holds every "
               "instance again")

STOP_TIMEOUT_S = 15.0
"""SIGTERM, then SIGKILL if the control plane has not exited within this."""
START_TIMEOUT_S = 60.0
SYNC_BOUND_S = 25.0
"""Every sidecar SYNCED, holding every healthy endpoint, within this after the restart (a
sidecar's reconnect backoff is capped at 5 s; the control plane takes a few s to start)."""
OBSERVE_EVERY_S = 1.0

INFRA_CANCEL_MARK = "did not complete within"
"""An order cancelled because a step kept failing (not for a business reason) has a reason
like ``reserve did not complete within 10 s (UNAVAILABLE: ...)``."""


# ---------------------------------------------------------------------- shared helpers
def infra_cancellations(stats: dict[str, Any]) -> int:
    """Orders the load generator saw cancelled for an infrastructure reason."""
    return sum(n for kind, n in (stats.get("cancel_reasons") or {}).items()
               if INFRA_CANCEL_MARK in kind)


@dataclass(frozen=True)
class LoadPoint:
    """The load generator's counts at one moment."""

    t: float
    confirmed: int
    cancelled: int
    errors: int
    infra_cancelled: int
    sent: int
    error_codes: dict[str, int]

    @classmethod
    def read(cls, mesh: Mesh, timeout_s: float = 15.0) -> LoadPoint:
        """The counts now (retried while the load generator does not answer; ChaosError
        after ``timeout_s``)."""
        s = wait_for(mesh.load_stats, timeout_s, poll_s=0.5)
        if not s:
            raise ChaosError(f"the load generator's /stats did not answer in {timeout_s:g}s")
        codes = {str(k): int(v) for k, v in (s.get("errors") or {}).items()}
        return cls(time.monotonic(), int(s.get("confirmed", 0)), int(s.get("cancelled", 0)),
                   sum(codes.values()), infra_cancellations(s), int(s.get("sent", 0)), codes)

    def failed_since(self, before: LoadPoint) -> int:
        """Calls that failed plus orders cancelled for infrastructure reasons since ``before``."""
        return (self.errors - before.errors) + (self.infra_cancelled - before.infra_cancelled)

    def new_error_codes(self, before: LoadPoint) -> dict[str, int]:
        return {k: v - before.error_codes.get(k, 0) for k, v in self.error_codes.items()
                if v > before.error_codes.get(k, 0)}


def quiet_baseline(mesh: Mesh, tl: Timeline, quiet_s: float,
                   timeout_s: float = 30.0) -> LoadPoint:
    """Wait (at most ``timeout_s``) for ``quiet_s`` seconds of load with no failed order,
    so what a scenario measures is its own doing and not the tail of an earlier disturbance;
    returns the load at the end of that window (or at the timeout, said on the timeline)."""
    deadline = time.monotonic() + timeout_s
    start = LoadPoint.read(mesh)
    while True:
        time.sleep(quiet_s)
        now = LoadPoint.read(mesh)
        if now.failed_since(start) == 0 and now.confirmed > start.confirmed:
            return now
        if time.monotonic() >= deadline:
            tl.observe(f"no quiet baseline within {timeout_s:g}s: {now.failed_since(start)} "
                       f"orders failed and {now.confirmed - start.confirmed} confirmed in the "
                       f"last {quiet_s:g}s before the scenario began")
            return now
        start = now


def host_load() -> str:
    """The host's 1-minute load average against its cores, for the reader of a failure
    (a starved host fails calls by their deadlines whatever chaos does)."""
    try:
        return f"host load {os.getloadavg()[0]:.1f} on {os.cpu_count() or 1} cores"
    except OSError:
        return "host load unknown"


def sidecar_instances(mesh: Mesh) -> list[str]:
    return sorted(p.instance for p in mesh.state.find("sidecar"))


def expected_endpoints(mesh: Mesh) -> dict[str, set[str]]:
    """service -> the replicas state.json has for it (what every sidecar should hold)."""
    out: dict[str, set[str]] = {}
    for app in mesh.state.find("app"):
        out.setdefault(app.service, set()).add(app.instance)
    return out


def mesh_gaps(mesh: Mesh) -> list[str]:
    """What keeps the mesh from being whole (empty: every sidecar of state.json registered,
    connected, SYNCED, holding every replica of every service as a healthy endpoint)."""
    sidecars = mesh.sidecars()
    wanted = set(sidecar_instances(mesh))
    held = {s.instance: mesh.admin.held_snapshot(s.instance) for s in sidecars
            if s.instance in wanted and s.connected and s.state == "SYNCED"}
    return sync_gaps(sidecars, wanted, held, expected_endpoints(mesh))


def wait_whole(mesh: Mesh, timeout_s: float) -> tuple[bool, float, list[str]]:
    """Poll until ``mesh_gaps`` is empty: (whole, seconds waited, last gaps)."""
    t0 = time.monotonic()
    last: list[str] = ["not asked yet"]

    def whole() -> bool:
        nonlocal last
        try:
            last = mesh_gaps(mesh)
        except Exception as exc:  # the control plane not answering yet: keep polling
            last = [f"control plane: {type(exc).__name__}"]
            return False
        return not last
    ok = bool(wait_for(whole, timeout_s, poll_s=0.25))
    return ok, time.monotonic() - t0, last


# ---------------------------------------------------------------------- the scenario
def _discovery(mesh: Mesh, instances: list[str],
               timeout_s: float = 10.0) -> dict[str, dict[str, Any]]:
    """instance -> its admin /stats (discovery and snapshot), for those that answer (each
    asked again for up to ``timeout_s``)."""
    out: dict[str, dict[str, Any]] = {}
    for inst in instances:
        s = wait_for(lambda inst=inst: mesh.sidecar_stats(inst), timeout_s, poll_s=0.5)
        if not s:
            continue
        out[inst] = {"connected": bool((s.get("discovery") or {}).get("connected")),
                     "reconnects": int((s.get("discovery") or {}).get("reconnects") or 0),
                     "version": str(s.get("snapshot_version") or ""),
                     "hash": str(s.get("snapshot_hash") or "")}
    return out


def _stop(mesh: Mesh, tl: Timeline) -> float:
    """SIGTERM the control plane, wait for it to exit (SIGKILL after STOP_TIMEOUT_S);
    returns when it exited (monotonic)."""
    cp = mesh.control_plane()
    if not mesh.alive(cp):
        raise ChaosError(f"the control plane (pid {cp.pid}) is not running")
    tl.action(f"control plane (pid {cp.pid}, {cp.address}): SIGTERM")
    mesh.kill(cp, signal.SIGTERM)
    if not mesh.wait_gone(cp, STOP_TIMEOUT_S):
        tl.action(f"control plane still running after {STOP_TIMEOUT_S:g}s: SIGKILL")
        mesh.kill(cp, signal.SIGKILL)
        if not mesh.wait_gone(cp, 10.0):
            raise ChaosError(f"the control plane (pid {cp.pid}) does not stop")
    tl.observe("control plane exited: the mesh has no control plane now")
    return time.monotonic()


def _start(mesh: Mesh, tl: Timeline) -> None:
    cp = mesh.control_plane()
    tl.action(f"control plane: started again on {cp.address} (same CA and data dir)")
    new = mesh.restart(cp, timeout_s=START_TIMEOUT_S)
    tl.observe(f"control plane ready again (pid {new.pid}, {new.address})")


def run(mesh: Mesh, tl: Timeline, opts: Options) -> None:
    """Stop the control plane past the grace period under load; check the data plane and
    the resync (see the module doc)."""
    grace = float(mesh.state.settings.get("grace_period_s", 10.0))
    outage_s = grace + opts.pick(2.0, max(grace, 10.0))
    settle_s = opts.pick(2.0, 10.0)
    instances = sidecar_instances(mesh)
    tl.measure("grace_period_s", grace)
    tl.say(host_load())

    ok, took, gaps = wait_whole(mesh, SYNC_BOUND_S)
    if not ok:
        raise ChaosError(f"the mesh is not whole before the scenario: {'; '.join(gaps[:3])}")
    before = quiet_baseline(mesh, tl, opts.pick(1.5, 3.0))
    disc_before = _discovery(mesh, instances)
    tl.observe(f"before: {len(instances)} sidecars SYNCED on snapshot "
               f"{sorted({d['version'] for d in disc_before.values()})}; load: confirmed "
               f"{before.confirmed}, errors {before.errors}")

    points: list[LoadPoint] = []
    disc_late: dict[str, dict[str, Any]] = {}
    exited_at = _stop(mesh, tl)
    restarted = False
    try:
        last_note = 0.0
        while time.monotonic() - exited_at < outage_s:
            time.sleep(min(OBSERVE_EVERY_S, max(0.0, outage_s - (time.monotonic() - exited_at))))
            down_for = time.monotonic() - exited_at
            try:
                points.append(LoadPoint.read(mesh, timeout_s=0.0))
            except ChaosError as exc:
                tl.observe(str(exc))
            if down_for > grace and len(disc_late) < len(instances):
                first = not disc_late
                disc_late.update(_discovery(mesh, [i for i in instances if i not in disc_late],
                                            timeout_s=0.0))
                off = sum(not d["connected"] for d in disc_late.values())
                if first or len(disc_late) == len(instances):
                    tl.observe(f"{down_for:.1f}s down (past the {grace:g}s grace period): "
                               f"{len(disc_late)}/{len(instances)} sidecars answer their "
                               f"admin port, {off} know the control plane is gone")
            if points and down_for - last_note >= opts.pick(2.0, 5.0):
                last_note = down_for
                p = points[-1]
                tl.observe(f"{down_for:.1f}s down: orders confirmed {p.confirmed} "
                           f"(+{p.confirmed - before.confirmed}), failed calls "
                           f"{p.errors - before.errors}")
        outage_end = LoadPoint.read(mesh)
        _start(mesh, tl)
        restarted = True
    finally:
        if not restarted:   # whatever went wrong, never leave the mesh without its control plane
            cp = mesh.control_plane()
            if not mesh.alive(cp):
                _start(mesh, tl)
    outage = time.monotonic() - exited_at
    tl.measure("outage_s", round(outage, 2))
    tl.expect("control plane was down longer than the grace period", outage > grace,
              f"down {outage:.1f}s, grace period {grace:g}s")

    # The data plane on its last snapshot, while the control plane was away.
    kept = [i for i in instances
            if i in disc_late and disc_late[i]["hash"] == disc_before.get(i, {}).get("hash")]
    tl.expect("every sidecar kept serving its last snapshot", len(kept) == len(instances),
              f"{len(kept)}/{len(instances)} answered past the grace period on the snapshot "
              f"they held before")
    tl.expect("every sidecar noticed the control plane was gone",
              bool(disc_late) and not any(d["connected"] for d in disc_late.values()),
              f"{sum(not d['connected'] for d in disc_late.values())}/{len(instances)} "
              f"disconnected past the grace period")
    confirmed_down = outage_end.confirmed - before.confirmed
    tl.measure("confirmed_while_down", confirmed_down)
    tl.measure("confirmed_per_s_while_down",
               round(confirmed_down / max(outage_end.t - before.t, 1e-9), 2))
    tl.expect("orders kept confirming while the control plane was down", confirmed_down > 0,
              f"+{confirmed_down} confirmed in {outage_end.t - before.t:.1f}s")

    # The resync.
    api_t0 = time.monotonic()
    answered = wait_for(mesh.sidecars, SYNC_BOUND_S)
    tl.observe(f"the Admin API answers again after {time.monotonic() - api_t0:.1f}s"
               if answered is not None else "the Admin API does not answer")
    ok, took, gaps = wait_whole(mesh, SYNC_BOUND_S)
    took_total = time.monotonic() - api_t0
    tl.measure("resync_s", round(took_total, 2))
    if ok:
        tl.observe(f"every sidecar SYNCED again and holding every replica, "
                   f"{took_total:.1f}s after the restart")
    tl.expect(f"every sidecar SYNCED again within {SYNC_BOUND_S:g}s", ok,
              f"{took_total:.1f}s" if ok else "; ".join(gaps[:4]))
    registered = {s.instance: s for s in (wait_for(mesh.sidecars, 5.0) or [])}
    missing = [i for i in instances if i not in registered or not registered[i].connected]
    tl.expect("the registry holds every instance again", not missing,
              f"{len(instances) - len(missing)}/{len(instances)} registered and connected"
              + (f"; missing {missing}" if missing else ""))
    disc_after = _discovery(mesh, instances)
    resynced = [i for i in instances
                if disc_after.get(i, {}).get("reconnects", 0)
                > disc_before.get(i, {}).get("reconnects", 0)]
    tl.observe(f"{len(resynced)}/{len(instances)} sidecars report a new discovery stream "
               f"(resynced)")

    # Load after the resync, and the whole window.
    time.sleep(settle_s)
    after = LoadPoint.read(mesh)
    failed = after.failed_since(before)
    tl.measure("failed_orders", failed)
    tl.measure("load_errors", after.errors - before.errors)
    tl.measure("infra_cancelled", after.infra_cancelled - before.infra_cancelled)
    tl.measure("confirmed_total", after.confirmed - before.confirmed)
    tl.expect("no call failed and no order was cancelled for an infrastructure reason",
              failed == 0,
              f"errors {after.new_error_codes(before) or 0}, infrastructure cancellations "
              f"{after.infra_cancelled - before.infra_cancelled}, confirmed "
              f"+{after.confirmed - before.confirmed}" + ("" if failed == 0 else
                                                          f"; {host_load()}"))
    tl.expect("orders keep confirming after the resync", after.confirmed > outage_end.confirmed,
              f"+{after.confirmed - outage_end.confirmed} confirmed in the "
              f"{after.t - outage_end.t:.1f}s after the outage")
