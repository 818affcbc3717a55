"""``meshctl``'s security commands: ``ca rotate`` and ``ca status`` (the CA rotation),
``audit`` and ``certs revoke``. ``meshctl`` registers ``COMMANDS`` on its group.

The pure parts (rows of the tables, documents for ``-o json``) are functions of the RPC
answers, testable without a control plane.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import grpc

from control_plane.cli_common import (
    MeshctlError,
    age,
    client,
    duration_option_value,
    emit,
    iso,
    output_option,
)
from protos.mesh.v1 import control_pb2 as pb

COMMANDS: list[click.Command] = []
"""What ``meshctl`` adds to its group (each command appends itself below)."""


# --------------------------------------------------------------------------- ca (rotation)
CA_WAIT_INTERVAL_S = 1.0     # ``ca rotate --wait`` polls the status this often
CA_WAIT_DEFAULT = "10m"
SHORT_HASH = 12              # hex digits of a hash shown in tables


def ca_status_doc(resp: pb.GetCAStatusResponse) -> dict[str, Any]:
    """``ca status -o json``: the phase, the rotation, the CAs and every connected sidecar
    (times as RFC 3339 and unix seconds; hashes whole)."""
    return {
        "phase": resp.phase,
        "rotation_id": resp.rotation_id,
        "phase_since": iso(int(resp.phase_since_unix)) if resp.phase_since_unix else None,
        "phase_since_unix": resp.phase_since_unix,
        "bundle_sha256": resp.bundle_sha256,
        "error": resp.error,
        "cas": [{"sha256": c.sha256, "subject": c.subject,
                 "not_after": iso(c.not_after_unix), "not_after_unix": c.not_after_unix,
                 "signing": c.signing, "in_bundle": c.in_bundle} for c in resp.cas],
        "sidecars": [{"service": s.service, "instance": s.instance,
                      "cert_serial": s.cert_serial, "issuer_sha256": s.issuer_sha256,
                      "bundle_sha256": s.bundle_sha256, "caught_up": s.caught_up}
                     for s in resp.sidecars],
    }


def _short(sha: str) -> str:
    return sha[:SHORT_HASH] if sha else "-"


def ca_rows(doc: dict[str, Any]) -> list[list[str]]:
    """Per CA of a ``ca_status_doc``: hash, subject, expiry, signing, in the bundle."""
    return [[_short(c["sha256"]), c["subject"], c["not_after"],
             "yes" if c["signing"] else "-", "yes" if c["in_bundle"] else "-"]
            for c in doc["cas"]]


def sidecar_trust_rows(doc: dict[str, Any]) -> list[list[str]]:
    """Per sidecar of a ``ca_status_doc``: service, instance, certificate serial, issuing
    CA and bundle (short hashes; the issuer named ``new``/``old`` when it is a listed CA's
    signing one), caught up."""
    signing = {c["sha256"] for c in doc["cas"] if c["signing"]}
    rows = []
    for s in doc["sidecars"]:
        issuer = _short(s["issuer_sha256"])
        if s["issuer_sha256"] and s["issuer_sha256"] in signing:
            issuer += " (signing)"
        bundle = _short(s["bundle_sha256"])
        if s["bundle_sha256"] and s["bundle_sha256"] == doc["bundle_sha256"]:
            bundle += " (current)"
        rows.append([s["service"], s["instance"], s["cert_serial"] or "-", issuer, bundle,
                     "yes" if s["caught_up"] else "NO"])
    return rows


def ca_headline(doc: dict[str, Any]) -> str:
    """One line: the phase, since when, and how many sidecars caught up."""
    n = len(doc["sidecars"])
    up = sum(1 for s in doc["sidecars"] if s["caught_up"])
    if not doc["rotation_id"]:
        return f"phase IDLE (no CA rotation yet); {up}/{n} sidecar(s) hold the current identity"
    since = f" since {doc['phase_since']} ({age(doc['phase_since_unix'])} ago)" \
        if doc["phase_since"] else ""
    return (f"CA rotation {doc['rotation_id']}: phase {doc['phase']}{since}; {up}/{n} "
            "sidecar(s) caught up")


CA_COLUMNS = ["CA", "SUBJECT", "NOT AFTER", "SIGNING", "IN BUNDLE"]
SIDECAR_TRUST_COLUMNS = ["SERVICE", "INSTANCE", "CERT SERIAL", "ISSUER", "BUNDLE", "CAUGHT UP"]


@click.group("ca")
def ca_group() -> None:
    """The mesh's certificate authority: rotate it without an outage, follow a rotation."""


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text (PEM) file"
        raise MeshctlError(f"cannot read the {what} {path}: {reason}") from None


@ca_group.command("rotate")
@click.option("--ca-cert", "ca_cert", default=None, metavar="FILE",
              help="The new CA's certificate (PEM; an intermediate may be followed by its "
                   "chain). Default: the control plane makes a new root.")
@click.option("--ca-key", "ca_key", default=None, metavar="FILE",
              help="The new CA's private key (PEM, ECDSA P-256), with --ca-cert. It is sent "
                   "to the control plane over mTLS and kept in its CA dir (mode 0600).")
@click.option("--wait", is_flag=True, default=False,
              help="Follow the rotation (one line per phase) until it is DONE.")
@click.option("--timeout", "timeout_s", default=CA_WAIT_DEFAULT, show_default=True,
              callback=duration_option_value, help="With --wait: give up after this long "
                                                   "(exit 1; the rotation goes on).")
@output_option
@click.pass_context
def ca_rotate(ctx: click.Context, ca_cert: str | None, ca_key: str | None, wait: bool,
              timeout_s: int, output: str) -> None:
    """Start a CA rotation: the new CA joins the trust bundle beside the old one
    (BUNDLE_BOTH), re-issues every workload (REISSUE), then the old one leaves the bundle
    (DROP_OLD) and is trusted no more (DONE). No call fails meanwhile. Follow it with
    ``meshctl ca status``. Join tokens made before the rotation stop working for new
    sidecars once the old CA leaves the bundle: make new ones."""
    if bool(ca_cert) != bool(ca_key):
        raise click.UsageError("--ca-cert and --ca-key go together (neither: a new root)")
    request = pb.RotateCARequest()
    if ca_cert and ca_key:
        request.ca_cert_pem = _read(ca_cert, "CA certificate")
        request.ca_key_pem = _read(ca_key, "CA key")
    c = client(ctx)
    resp = c.call("RotateCA", request, bare=(grpc.StatusCode.FAILED_PRECONDITION,
                                            grpc.StatusCode.INVALID_ARGUMENT))
    doc = {"rotation_id": resp.rotation_id, "phase": resp.phase}
    if output != "table" and not wait:
        emit(ctx, output, doc, [], [])
        return
    if output == "table":
        click.echo(f"CA rotation {resp.rotation_id} started: phase {resp.phase} (follow it "
                   "with: meshctl ca status)")
    if not wait:
        return
    deadline = time.monotonic() + timeout_s
    phase, error = resp.phase, ""
    while True:
        status = c.call("GetCAStatus", pb.GetCAStatusRequest())
        if status.rotation_id != resp.rotation_id:
            raise MeshctlError(f"another CA rotation ({status.rotation_id}) replaced "
                               f"{resp.rotation_id}")
        if status.phase != phase and output == "table":
            click.echo(f"phase {status.phase}")
        if status.error and status.error != error and output == "table":
            click.echo(f"stuck: {status.error}", err=True)
        phase, error = status.phase, status.error
        if phase == "DONE":
            if output != "table":
                emit(ctx, output, ca_status_doc(status), [], [])
            return
        if time.monotonic() >= deadline:
            raise MeshctlError(f"CA rotation {resp.rotation_id} is still in phase {phase} "
                               f"after {timeout_s}s" + (f": {error}" if error else "")
                               + " (it goes on; see meshctl ca status)")
        time.sleep(CA_WAIT_INTERVAL_S)


@ca_group.command("status")
@output_option
@click.pass_context
def ca_status(ctx: click.Context, output: str) -> None:
    """The CA rotation's phase, the CAs (signing, in the trust bundle) and, per connected
    sidecar, its certificate's serial and issuer, its bundle and whether it has caught up
    with the phase."""
    resp = client(ctx).call("GetCAStatus", pb.GetCAStatusRequest())
    doc = ca_status_doc(resp)
    if output != "table":
        emit(ctx, output, doc, [], [])
        return
    click.echo(ca_headline(doc))
    if doc["error"]:
        click.echo(f"error: {doc['error']}")
    emit(ctx, output, doc, CA_COLUMNS, ca_rows(doc))
    if doc["sidecars"]:
        click.echo()
        emit(ctx, output, doc, SIDECAR_TRUST_COLUMNS, sidecar_trust_rows(doc))


COMMANDS.append(ca_group)


# --------------------------------------------------------------------------- audit
AUDIT_DEFAULT_LIMIT = 50
AUDIT_COLUMNS = ["TIME", "IDENTITY", "ACTION", "OBJECT", "RESULT"]


def audit_doc(resp: pb.ListAuditResponse) -> list[dict[str, Any]]:
    """``audit -o json``: one object per entry, newest first, with ``time`` (RFC 3339, UTC),
    ``identity`` (the caller's SPIFFE ID), ``action``, ``object`` and ``result``."""
    return [{"time": iso(int(e.time_unix)), "identity": e.identity, "action": e.action,
             "object": e.object, "result": e.result} for e in resp.entries]


def audit_rows(doc: list[dict[str, Any]]) -> list[list[str]]:
    """Per entry of an ``audit_doc``: time, identity, action, object, result."""
    return [[e["time"], e["identity"], e["action"], e["object"] or "-", e["result"]]
            for e in doc]


@click.command("audit")
@click.option("--limit", type=click.IntRange(1, 10_000), default=AUDIT_DEFAULT_LIMIT,
              show_default=True, help="How many entries, newest first.")
@click.option("--action", default="", metavar="A",
              help="Only this action: apply, delete, token.create, token.delete, "
                   "authz.default, ca.rotate, certs.revoke, certs.renew (or Admin.<Rpc> for "
                   "refused calls that change nothing).")
@output_option
@click.pass_context
def audit(ctx: click.Context, limit: int, action: str, output: str) -> None:
    """The audit log: who (SPIFFE ID) changed what on the mesh, when, and the result,
    refusals included; newest first."""
    resp = client(ctx).call("ListAudit", pb.ListAuditRequest(limit=limit, action=action))
    doc = audit_doc(resp)
    emit(ctx, output, doc, AUDIT_COLUMNS, audit_rows(doc))


COMMANDS.append(audit)


# --------------------------------------------------------------------------- certs revoke
@click.command("revoke")
@click.argument("serial", required=False, default=None)
@click.option("--instance", default=None, metavar="I",
              help="Every unexpired certificate of instance I (an id, or SERVICE/ID).")
@click.pass_context
def certs_revoke(ctx: click.Context, serial: str | None, instance: str | None) -> None:
    """Revoke the certificate SERIAL (hex, as ``meshctl certs`` shows it), or every one of
    an instance: it is never renewed, and every sidecar refuses its new connections at once
    (a revoked instance also leaves the endpoints, and may not join again under that id).
    Delete its join token too if the workload itself is not to be trusted again."""
    if bool(serial) == bool(instance):
        raise click.UsageError("give a SERIAL or --instance I (one of the two)")
    resp = client(ctx).call(
        "RevokeCertificate", pb.RevokeCertificateRequest(serial=serial or "",
                                                         instance=instance or ""),
        bare=(grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
              grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION))
    whose = f"instance {instance}: " if instance else ""
    click.echo(f"revoked {whose}certificate serial {', '.join(resp.serials)} (in the "
               f"deny-list of snapshot version {resp.version})")


CERTS_COMMANDS: list[click.Command] = [certs_revoke]
"""What ``meshctl`` adds to its ``certs`` group."""


# --------------------------------------------------------------------------- expiry
EXPIRY_WARN_FRACTION = 0.10   # of a certificate's lifetime
EXPIRY_WARN_S = 300           # when the lifetime is not known
EXPIRING, EXPIRED = "expiring", "expired"


def expiry_state(not_after: float, now: float, issued_at: float = 0.0) -> str:
    """``expired`` at or after ``not_after``; ``expiring`` within the last
    ``EXPIRY_WARN_FRACTION`` of its lifetime (from ``issued_at``), or within
    ``EXPIRY_WARN_S`` seconds when the lifetime is unknown (``issued_at`` 0); else "". A
    sidecar renews at two thirds of the lifetime, so a certificate this close to its end
    means renewal is failing. ``not_after`` 0 (unknown) is "". Pure; unix seconds."""
    if not not_after:
        return ""
    left = not_after - now
    if left <= 0:
        return EXPIRED
    lifetime = not_after - issued_at if 0 < issued_at < not_after else 0.0
    window = lifetime * EXPIRY_WARN_FRACTION if lifetime else EXPIRY_WARN_S
    return EXPIRING if left <= window else ""


def expiry_cell(not_after: float, state: str, now: float) -> str:
    """A table cell: the expiry (RFC 3339) with a marker when ``state`` is set."""
    when = iso(int(not_after))
    if state == EXPIRED:
        return f"{when} (EXPIRED)"
    if state == EXPIRING:
        return f"{when} (expires in {max(0, int(not_after - now))}s!)"
    return when


def expiry_warning(items: list[tuple[str, float, str]], now: float) -> str | None:
    """One line for stderr about ``(name, not_after, state)`` items that expired or expire
    soon; None when there are none."""
    bad = [(name, na, st) for name, na, st in items if st in (EXPIRING, EXPIRED)]
    if not bad:
        return None
    parts = [f"{name} {'expired' if st == EXPIRED else 'expires in ' + str(int(na - now)) + 's'}"
             for name, na, st in bad]
    return (f"warning: {len(bad)} certificate(s) expired or near expiry (renewal failing?): "
            + ", ".join(parts))
