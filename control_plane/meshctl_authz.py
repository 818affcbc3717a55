"""``meshctl authz``: authorization as the control plane sees it.

    meshctl authz check SOURCE_ID DEST_SERVICE METHOD [-o json|yaml]
    meshctl authz default [allow|deny]

``check`` asks the control plane what the mesh decides for a call from SOURCE_ID (a SPIFFE ID,
or a bare service name for ``spiffe://<trust-domain>/service/<name>``) to METHOD (a gRPC path,
``/package.Service/Method``) of DEST_SERVICE (``Admin.CheckAuthz``: the decision the
destination's sidecars make): it prints ``allow`` or ``deny`` and what decided, with the
dry-run policies' verdict when the service has any, and exits 0 for allow, 1 for deny (as
``kubectl auth can-i``; an error also exits non-zero, with one line on stderr). ``default``
prints the mesh-wide default, or sets it (``allow`` until someone sets it).

``meshctl`` registers ``COMMANDS`` on its group. ``check_doc`` and ``check_lines`` are pure
functions of the answer.
"""

from __future__ import annotations

import json
from typing import Any

import click
import grpc

from control_plane.cli_common import client
from protos.mesh.v1 import control_pb2 as pb

ALLOWED_EXIT, DENIED_EXIT = 0, 1


def check_doc(source: str, service: str, method: str,
              resp: pb.CheckAuthzResponse) -> dict[str, Any]:
    """The answer of ``CheckAuthz`` as a document (``-o json|yaml``): ``decision`` (allow or
    deny), ``allowed``, ``policy`` ("" = the mesh default or no rule), ``rule`` (-1 = none),
    ``reason``, ``dry_run`` (None, or ``{decision, reason}``), and what was asked."""
    return {"source": source, "service": service, "method": method,
            "decision": "allow" if resp.allowed else "deny", "allowed": resp.allowed,
            "policy": resp.policy, "rule": resp.rule, "reason": resp.reason,
            "dry_run": ({"decision": resp.dry_run, "reason": resp.dry_run_reason}
                        if resp.dry_run else None)}


def check_lines(doc: dict[str, Any]) -> list[str]:
    """The table form: the decision alone on the first line (what scripts read), then what
    decided (policy and rule, or the default), then the dry-run verdict when there is one."""
    lines = [doc["decision"]]
    by = (f"policy {doc['policy']} rule {doc['rule']}" if doc["policy"]
          else "no rule (the mesh default, or no ALLOW rule matched)")
    lines.append(f"  decided by: {by}")
    lines.append(f"  reason:     {doc['reason']}")
    dry = doc["dry_run"]
    if dry:
        lines.append(f"  dry run:    {dry['decision']} ({dry['reason']}); not enforced")
    return lines


@click.group("authz")
def authz() -> None:
    """Authorization: what the policies decide for a call, the mesh-wide default."""


@authz.command("check")
@click.argument("source")
@click.argument("service", metavar="DEST_SERVICE")
@click.argument("method")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table",
              show_default=True, help="Output format.")
@click.pass_context
def check(ctx: click.Context, source: str, service: str, method: str, output: str) -> None:
    """May SOURCE (a SPIFFE ID, or a service name) call METHOD (/package.Service/Method) of
    DEST_SERVICE? Prints allow or deny and the policy and rule that decided (and what dry-run
    policies would decide); exits 0 for allow, 1 for deny."""
    resp = client(ctx).call("CheckAuthz", pb.CheckAuthzRequest(
        source=source, service=service, method=method),
        bare=(grpc.StatusCode.INVALID_ARGUMENT,))
    doc = check_doc(source, service, method, resp)
    if output == "json":
        click.echo(json.dumps(doc, indent=2))
    elif output == "yaml":
        import yaml
        click.echo(yaml.safe_dump(doc, sort_keys=False).rstrip())
    else:
        click.echo("\n".join(check_lines(doc)))
    ctx.exit(ALLOWED_EXIT if resp.allowed else DENIED_EXIT)


@authz.command("default")
@click.argument("action", required=False, type=click.Choice(["allow", "deny"],
                                                            case_sensitive=False))
@click.pass_context
def default(ctx: click.Context, action: str | None) -> None:
    """Print the mesh-wide default for services without ALLOW rules, or set it to ACTION
    (allow or deny). A new mesh allows until someone sets deny."""
    c = client(ctx)
    if action is None:
        click.echo(c.call("GetAuthzDefault", pb.GetAuthzDefaultRequest()).action)
        return
    action = action.lower()
    resp = c.call("SetAuthzDefault", pb.SetAuthzDefaultRequest(action=action),
                  bare=(grpc.StatusCode.INVALID_ARGUMENT,))
    if resp.previous == action:
        click.echo(f"authz default: {action} (unchanged)")
    else:
        click.echo(f"authz default: {action} (was {resp.previous}; snapshot version "
                   f"{resp.version})")


COMMANDS = [authz]
