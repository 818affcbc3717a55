"""``cert-rotation``: ``meshctl certs renew`` for every service, one service after another,
while the saga runs (the full run rotates every certificate more than once).

What must hold (DESIGN: "rotating certificates loses no request"): no call fails (the load
generator's errors and its cancellations for infrastructure reasons do not grow; the
sidecars' ``/metrics`` show no call ending UNAVAILABLE, RESET, INTERNAL, UNKNOWN or
DEADLINE_EXCEEDED and no failed TLS handshake during the rotation) and every sidecar got a
new certificate: ``ListCertificates`` shows a new serial, issued after the ask, for every
instance, and each sidecar's ``mesh_certificate_expiry_timestamp_seconds`` is its new
certificate's ``not_after``.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from chaos.mesh import ChaosError, Mesh, wait_for
from chaos.scenarios import Options
from chaos.scenarios.control_plane_down import (
    LoadPoint,
    host_load,
    quiet_baseline,
    sidecar_instances,
    wait_whole,
)
from chaos.timeline import Timeline

NAME = "cert-rotation"
EXPECTATION = ("'meshctl certs renew' for every service under load: zero failed calls, and "
               "every sidecar gets and serves a new certificate")

FAILURE_CODES = ("UNAVAILABLE", "RESET", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED")
"""Outcomes of a call between sidecars that a rotation must never cause (business answers
such as FAILED_PRECONDITION or ABORTED are the saga's own)."""
MESHCTL_TIMEOUT_S = 30.0
NEW_CERT_BOUND_S = 20.0
"""Every sidecar serves its new certificate within this after it was asked."""
SYNC_BOUND_S = 25.0
METRICS_TIMEOUT_S = 10.0
"""A sidecar's /metrics is retried this long before it counts as unread."""


@dataclass
class MetricsPoint:
    """What every sidecar's ``/metrics`` says at one moment."""

    calls_failed: Counter[str] = field(default_factory=Counter)
    """(direction code) -> calls that ended with one of FAILURE_CODES, over every sidecar."""
    calls: int = 0
    handshake_failures: int = 0
    handshakes: int = 0
    retries: int = 0
    expiry: dict[str, float] = field(default_factory=dict)
    """instance -> mesh_certificate_expiry_timestamp_seconds."""
    unread: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, mesh: Mesh, instances: list[str]) -> MetricsPoint:
        p = cls()
        for inst in instances:
            samples = wait_for(lambda inst=inst: mesh.sidecar_metrics(inst), METRICS_TIMEOUT_S,
                               poll_s=0.5)
            if not samples:
                p.unread.append(inst)
                continue
            for name, labels, value in samples:
                if name == "mesh_requests_total":
                    p.calls += int(value)
                    if labels.get("grpc_code") in FAILURE_CODES:
                        p.calls_failed[f"{labels.get('direction')} {labels['grpc_code']}"] += \
                            int(value)
                elif name == "mesh_tls_handshake_failures_total":
                    p.handshake_failures += int(value)
                elif name == "mesh_tls_handshakes_total":
                    p.handshakes += int(value)
                elif name == "mesh_retries_total":
                    p.retries += int(value)
                elif name == "mesh_certificate_expiry_timestamp_seconds":
                    p.expiry[inst] = value
        return p

    def failed_since(self, before: MetricsPoint) -> dict[str, int]:
        return {k: v - before.calls_failed.get(k, 0) for k, v in self.calls_failed.items()
                if v > before.calls_failed.get(k, 0)}


def _certs_by_instance(mesh: Mesh) -> dict[str, list[Any]]:
    """instance -> its certificates from ``ListCertificates``, oldest first."""
    out: dict[str, list[Any]] = {}
    for c in sorted(mesh.certificates(), key=lambda c: (c.issued_at_unix, c.serial)):
        out.setdefault(c.instance_id, []).append(c)
    return out


def meshctl(mesh: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    """``meshctl ARGS`` against this demo's control plane, with meshctl's own credentials."""
    cmd = [sys.executable, "-m", "control_plane.meshctl",
           "--control-plane", mesh.state.control_plane["api"],
           "--certs-dir", str(mesh.settings.ca_dir), *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=MESHCTL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ChaosError(f"meshctl {' '.join(args)}: no answer in {MESHCTL_TIMEOUT_S:g}s") \
            from None


def presented_serial(mesh: Mesh, instance: str) -> int:
    """The serial of the certificate sidecar ``instance``'s inbound listener presents to a
    new mTLS connection, opened with meshctl's admin certificate the way ``openssl s_client
    -cert admin.pem`` would (the sidecar then refuses the admin identity as a caller, which
    is what it should do; only the handshake matters here)."""
    host, _, port = mesh.sidecar(instance).inbound.rpartition(":")
    ca = mesh.settings.ca_dir
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False   # SPIFFE certificates name a URI, not a host
    ctx.load_verify_locations(str(ca / "ca.pem"))
    ctx.load_cert_chain(str(ca / "admin.pem"), str(ca / "admin-key.pem"))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            ctx.wrap_socket(raw) as tls:
        return int(str(tls.getpeercert().get("serialNumber", "0")), 16)


def _renew_service(mesh: Mesh, tl: Timeline, service: str) -> list[str]:
    """``meshctl certs renew --service SERVICE``; the instances it says it asked."""
    tl.action(f"meshctl certs renew --service {service}")
    r = meshctl(mesh, "certs", "renew", "--service", service)
    out = (r.stdout + r.stderr).strip()
    if r.returncode != 0:
        tl.observe(f"meshctl failed (exit {r.returncode}): {out.splitlines()[-1] if out else ''}")
        return []
    _, _, names = out.partition(": ")
    asked = [n.strip() for n in names.split(",") if n.strip()]
    tl.observe(f"control plane told {len(asked)} sidecar(s) of {service} to renew: "
               f"{', '.join(asked)}")
    return asked


def _serving_new(mesh: Mesh, instances: list[str], old_serials: dict[str, set[str]],
                 asked_at_unix: float) -> tuple[dict[str, Any], dict[str, float]]:
    """(instance -> its newest certificate issued since ``asked_at_unix`` with a serial not
    in ``old_serials``, instance -> the expiry its /metrics shows) for every instance."""
    certs = _certs_by_instance(mesh)
    new: dict[str, Any] = {}
    for inst in instances:
        fresh = [c for c in certs.get(inst, []) if c.serial not in old_serials.get(inst, set())
                 and c.issued_at_unix >= int(asked_at_unix) - 1]
        if fresh:
            new[inst] = fresh[-1]
    shown = MetricsPoint.read(mesh, instances).expiry
    return new, shown


@dataclass
class Rotation:
    """What one rotation of every service's certificates did."""

    n: int
    asked: set[str]
    new: dict[str, Any]
    """instance -> its new certificate (``CertificateInfo``)."""
    expiry_shown: dict[str, float]
    """instance -> the expiry its /metrics shows."""
    presented: dict[str, bool]
    """instance (with an inbound listener) -> its inbound presents the new certificate."""
    took_s: float
    """From the last ask until every sidecar served its new certificate (or the bound)."""

    def serving(self, instances: list[str]) -> list[str]:
        """The instances whose /metrics show their new certificate's expiry."""
        return [i for i in instances if i in self.new
                and abs(self.expiry_shown.get(i, 0.0) - self.new[i].not_after_unix) < 1.0]


def _presented(mesh: Mesh, new: dict[str, Any], instances: list[str]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for inst in instances:
        try:
            serial = presented_serial(mesh, inst)
        except (OSError, ValueError):
            out[inst] = False
            continue
        out[inst] = inst in new and serial == int(new[inst].serial, 16)
    return out


def _rotate(mesh: Mesh, tl: Timeline, opts: Options, instances: list[str], n: int) -> Rotation:
    """``meshctl certs renew --service S`` for every service, one after another, then wait
    until every sidecar serves a new certificate (or the bound)."""
    certs = _certs_by_instance(mesh)
    old_serials = {i: {c.serial for c in certs.get(i, [])} for i in instances}
    old_expiry = MetricsPoint.read(mesh, instances).expiry
    with_inbound = [i for i in instances if mesh.sidecar(i).inbound]
    services = sorted({p.service for p in mesh.state.find("sidecar")})
    asked_at = time.time()
    asked: set[str] = set()
    tl.say(f"rotation {n}: {len(services)} services, one after another")
    for i, service in enumerate(services):
        if i:
            time.sleep(opts.pick(0.5, 3.0))
        asked |= set(_renew_service(mesh, tl, service))
    t0 = time.monotonic()

    rot = Rotation(n, asked, {}, {}, {}, 0.0)

    def done() -> bool:
        rot.new, rot.expiry_shown = _serving_new(mesh, instances, old_serials, asked_at)
        if len(rot.serving(instances)) < len(instances):
            return False
        rot.presented = _presented(mesh, rot.new, with_inbound)
        return all(rot.presented.values())
    wait_for(done, NEW_CERT_BOUND_S, poll_s=0.5)
    rot.took_s = time.monotonic() - t0
    if not rot.presented:
        rot.presented = _presented(mesh, rot.new, with_inbound)
    later = [i for i in instances
             if i in rot.new and rot.expiry_shown.get(i, 0.0) > old_expiry.get(i, float("inf"))]
    tl.observe(f"rotation {n}: {len(rot.new)}/{len(instances)} sidecars have a new "
               f"certificate ({', '.join(f'{i} {rot.new[i].serial[:8]}' for i in sorted(rot.new))}"
               f"); {len(later)} show a later expiry in /metrics; "
               f"{sum(rot.presented.values())}/{len(with_inbound)} inbound listeners present "
               f"the new one to a new connection")
    return rot


def run(mesh: Mesh, tl: Timeline, opts: Options) -> None:
    """Renew every service's certificates under load; check no call failed and every
    sidecar serves a new certificate (see the module doc)."""
    instances = sidecar_instances(mesh)
    tl.say(host_load())
    rounds = int(opts.pick(1, 3))
    settle_s = opts.pick(2.0, 10.0)
    ok, _, gaps = wait_whole(mesh, SYNC_BOUND_S)
    if not ok:
        raise ChaosError(f"the mesh is not whole before the scenario: {'; '.join(gaps[:3])}")
    load_before = quiet_baseline(mesh, tl, opts.pick(1.5, 3.0))
    m_before = MetricsPoint.read(mesh, instances)
    if m_before.unread:
        raise ChaosError(f"cannot read the sidecars' /metrics: {'; '.join(m_before.unread)}")
    tl.observe(f"before: {len(instances)} sidecars, {m_before.calls} calls counted in their "
               f"/metrics; load: confirmed {load_before.confirmed}, errors {load_before.errors}")

    took_max = 0.0
    for n in range(1, rounds + 1):
        rot = _rotate(mesh, tl, opts, instances, n)
        took_max = max(took_max, rot.took_s)
        not_asked = [i for i in instances if i not in rot.asked]
        no_new = [i for i in instances if i not in rot.new]
        serving = rot.serving(instances)
        not_presented = sorted(i for i, ok in rot.presented.items() if not ok)
        tl.expect("every sidecar was asked to renew", not not_asked,
                  f"rotation {n}: {len(rot.asked)} asked"
                  + (f"; not {not_asked}" if not_asked else ""))
        tl.expect("every sidecar got a new certificate", not no_new,
                  f"rotation {n}: a new serial, issued after the ask, for "
                  f"{len(rot.new)}/{len(instances)}" + (f"; none for {no_new}" if no_new else ""))
        tl.expect("every sidecar serves its new certificate", len(serving) == len(instances),
                  f"rotation {n}: /metrics expiry is the new not_after for "
                  f"{len(serving)}/{len(instances)}, {rot.took_s:.1f}s after the last ask")
        tl.expect("every inbound listener presents its new certificate",
                  bool(rot.presented) and not not_presented,
                  f"rotation {n}: {len(rot.presented) - len(not_presented)}/"
                  f"{len(rot.presented)} over a new mTLS connection"
                  + (f"; old or none: {not_presented}" if not_presented else ""))
    tl.measure("rotations", rounds)
    tl.measure("new_certificate_s", round(took_max, 2))

    time.sleep(settle_s)   # calls that were in flight during the rotation end
    load_after = LoadPoint.read(mesh)
    m_after = MetricsPoint.read(mesh, instances)
    failed_load = load_after.failed_since(load_before)
    failed_mesh = m_after.failed_since(m_before)
    handshakes = m_after.handshakes - m_before.handshakes
    handshake_failures = m_after.handshake_failures - m_before.handshake_failures
    tl.measure("load_errors", load_after.errors - load_before.errors)
    tl.measure("infra_cancelled", load_after.infra_cancelled - load_before.infra_cancelled)
    tl.measure("confirmed_during", load_after.confirmed - load_before.confirmed)
    tl.measure("sidecar_calls_during", m_after.calls - m_before.calls)
    tl.measure("sidecar_calls_failed", sum(failed_mesh.values()))
    tl.measure("tls_handshakes_during", handshakes)
    tl.measure("tls_handshake_failures", handshake_failures)
    tl.measure("retries_during", m_after.retries - m_before.retries)
    tl.observe(f"during the rotation: {m_after.calls - m_before.calls} calls through the "
               f"sidecars, {handshakes} TLS handshakes on their inbound listeners, "
               f"{m_after.retries - m_before.retries} retries")
    tl.expect("zero failed calls at the load generator", failed_load == 0,
              f"errors {load_after.new_error_codes(load_before) or 0}, infrastructure "
              f"cancellations {load_after.infra_cancelled - load_before.infra_cancelled}, "
              f"confirmed +{load_after.confirmed - load_before.confirmed}"
              + ("" if failed_load == 0 else f"; {host_load()}"))
    tl.expect("no call between sidecars failed", not failed_mesh and not m_after.unread,
              f"{failed_mesh or 'none'} of {m_after.calls - m_before.calls} calls"
              + (f"; unread {m_after.unread}" if m_after.unread else "")
              + ("" if not failed_mesh else f"; {host_load()}"))
    tl.expect("no TLS handshake failed", handshakes > 0 and handshake_failures == 0,
              f"{handshake_failures} failed of {handshakes}")
    tl.expect("orders kept confirming during the rotation",
              load_after.confirmed > load_before.confirmed,
              f"+{load_after.confirmed - load_before.confirmed}")
    ok, took, gaps = wait_whole(mesh, SYNC_BOUND_S)
    tl.expect("every sidecar SYNCED after the rotation", ok,
              f"{took:.1f}s" if ok else "; ".join(gaps[:4]))
