"""``meshctl``: the mesh's command line; talks only gRPC (mTLS, admin identity) to the
control plane.

    meshctl token create SERVICE [--ttl 1h] [--uses N]   # prints the token alone
    meshctl token list | meshctl token delete ID
    meshctl certs [renew [--service S] | revoke SERIAL|--instance I]   # near expiry: marked
    meshctl audit [--limit N] [--action A]      # who changed what, when, with what result
    meshctl status | meshctl config INSTANCE
    meshctl topology [-o dot] [--svg FILE] [--png FILE]   # services, edges, golden signals
    meshctl top [--interval 2] [--iterations N]           # live services and edges
    meshctl traces [--service S] [--errors] [--limit N]   # recent traces, newest first
    meshctl trace ID                            # span tree as a waterfall, events under spans
    meshctl tap SERVICE [--method M] [--duration 60s] [--max N]   # calls as they happen
    meshctl breakers [--service S]              # outlier detection and limits, as reported
    meshctl apply -f FILE|DIR|- [--dry-run]     # Route, TrafficPolicy, Fault, Authorization-
                                                # Policy documents
    meshctl get KIND [NAME] [-o yaml|json] [--revision N]
    meshctl delete KIND NAME | meshctl diff -f FILE|DIR|-
    meshctl fault inject SERVICE [--method M] (--abort CODE | --delay MS) --percent P
    meshctl fault clear SERVICE
    meshctl authz check SOURCE_ID DEST_SERVICE METHOD   # allow (exit 0) or deny (exit 1)
    meshctl authz default [allow|deny]

Tables by default, ``-o json|yaml`` for scripts (``tap -o json``: JSON lines); errors are one
line on stderr and a non-zero exit. The observability commands (topology, top, traces,
trace, tap) live in ``control_plane.meshctl_observe``; what all commands share in
``control_plane.cli_common``.
"""

from __future__ import annotations

import difflib
import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import grpc
import yaml

from control_plane import meshctl_authz, meshctl_observe, meshctl_security
from control_plane.cli_common import (
    PROG,
    RPC_TIMEOUT_S,
    Client,
    MeshctlError,
    RpcFailed,
    duration_option_value,
    parse_duration,
)
from control_plane.cli_common import age as _age
from control_plane.cli_common import client as _client
from control_plane.cli_common import emit as _emit
from control_plane.cli_common import iso as _iso
from control_plane.cli_common import output_option as _output
from mesh_common.config import UNCHANGED, ConfigError, check_name, kind_of, to_yaml
from mesh_common.numbers import FiniteFloatRange
from protos.mesh.v1 import control_pb2 as pb

__all__ = ["PROG", "RPC_TIMEOUT_S", "Client", "MeshctlError", "RpcFailed", "cli",
           "load_documents", "main", "parse_duration", "read_documents"]

DEFAULT_CONTROL_PLANE = "127.0.0.1:15010"
DEFAULT_CERTS_DIR = "certs"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--control-plane", envvar="MESH_CONTROL_PLANE", default=DEFAULT_CONTROL_PLANE,
              show_default=True, help="API address of the control plane (env MESH_CONTROL_PLANE).")
@click.option("--certs-dir", envvar="MESH_CERTS_DIR", default=DEFAULT_CERTS_DIR,
              show_default=True,
              help="Where ca.pem, admin.pem and admin-key.pem are (env MESH_CERTS_DIR).")
@click.pass_context
def cli(ctx: click.Context, control_plane: str, certs_dir: str) -> None:
    """Operate the mesh through its control plane."""
    ctx.obj = {"control_plane": control_plane, "certs_dir": certs_dir}


@cli.group()
def token() -> None:
    """Join tokens: create, list, delete."""


_duration = duration_option_value


@token.command("create")
@click.argument("service")
@click.option("--ttl", default="1h", show_default=True, callback=_duration,
              help="How long the token may be used (90s, 30m, 1h, 7d).")
@click.option("--uses", type=click.IntRange(min=1), default=None,
              help="How many joins it allows (default: unlimited until it expires).")
@_output
@click.pass_context
def token_create(ctx: click.Context, service: str, ttl: int, uses: int | None,
                 output: str) -> None:
    """Create a join token for SERVICE; prints the token alone (-o json: with its details)."""
    resp = _client(ctx).call("CreateToken", pb.CreateTokenRequest(service=service, ttl_s=ttl,
                                                                   uses=uses or 0))
    if output == "table":
        click.echo(resp.token)
        return
    doc = {"id": resp.token_id, "service": resp.service, "expires_at": _iso(resp.expires_at_unix),
           "uses_left": None if resp.uses_left < 0 else resp.uses_left, "token": resp.token}
    _emit(ctx, output, doc, [], [])


@token.command("list")
@_output
@click.pass_context
def token_list(ctx: click.Context, output: str) -> None:
    """List join tokens (never their secrets)."""
    resp = _client(ctx).call("ListTokens", pb.ListTokensRequest())
    doc = [{"id": t.token_id, "service": t.service, "expires_at": _iso(t.expires_at_unix),
            "uses_left": None if t.uses_left < 0 else t.uses_left,
            "created_at": _iso(t.created_at_unix)} for t in resp.tokens]
    rows = [[d["id"], d["service"], d["expires_at"],
             "unlimited" if d["uses_left"] is None else str(d["uses_left"])] for d in doc]
    _emit(ctx, output, doc, ["ID", "SERVICE", "EXPIRES", "USES LEFT"], rows)


@token.command("delete")
@click.argument("token_id", metavar="ID")
@click.pass_context
def token_delete(ctx: click.Context, token_id: str) -> None:
    """Delete a join token (certificates issued with it stay valid until they expire)."""
    _client(ctx).call("DeleteToken", pb.DeleteTokenRequest(token_id=token_id))
    click.echo(f"deleted join token {token_id}")


@cli.group("certs", invoke_without_command=True)
@_output
@click.pass_context
def certs(ctx: click.Context, output: str) -> None:
    """Certificates the control plane issued: service, instance, serial, not_after, and
    whether it is each instance's current one. A current certificate in the last tenth of
    its lifetime (renewal failing) or expired is marked, with a warning on stderr (for one
    lifetime after its expiry: an instance gone for longer is not warned about)."""
    if ctx.invoked_subcommand is not None:
        return
    resp = _client(ctx).call("ListCertificates", pb.ListCertificatesRequest())
    now = time.time()
    latest: dict[tuple[str, str], int] = {}
    for i, c in enumerate(resp.certificates):  # issue order: an instance's last is current
        latest[(c.service, c.instance_id)] = i
    current = set(latest.values())
    states = [meshctl_security.expiry_state(c.not_after_unix, now, c.issued_at_unix)
              if i in current else "" for i, c in enumerate(resp.certificates)]
    doc = [{"service": c.service, "instance": c.instance_id, "serial": c.serial,
            "not_after": _iso(c.not_after_unix)} for c in resp.certificates]
    rows = [[d["service"], d["instance"], d["serial"],
             meshctl_security.expiry_cell(c.not_after_unix, st, now),
             "yes" if i in current else "-"]
            for i, (d, c, st) in enumerate(zip(doc, resp.certificates, states, strict=True))]
    _emit(ctx, output, doc, ["SERVICE", "INSTANCE", "SERIAL", "NOT AFTER", "CURRENT"], rows)
    warning = meshctl_security.expiry_warning(  # current ones, expired within a lifetime
        [(f"{c.service}/{c.instance_id}", c.not_after_unix, st)
         for c, st in zip(resp.certificates, states, strict=True)
         if st and now - c.not_after_unix < c.not_after_unix - c.issued_at_unix], now)
    if warning:
        click.echo(f"{PROG}: {warning}", err=True)


@certs.command("renew")
@click.option("--service", default="", help="Only the sidecars of this service (default: all).")
@click.pass_context
def certs_renew(ctx: click.Context, service: str) -> None:
    """Tell connected sidecars (of SERVICE, or all) to renew their certificates now."""
    resp = _client(ctx).call("RenewCertificates", pb.RenewCertificatesRequest(service=service))
    if not resp.instances:
        raise MeshctlError("no connected sidecar" + (f" of service {service!r}" if service
                                                      else ""))
    click.echo(f"asked {len(resp.instances)} sidecar(s) to renew: {', '.join(resp.instances)}")


@cli.command("status")
@_output
@click.pass_context
def status(ctx: click.Context, output: str) -> None:
    """One row per sidecar: addresses, snapshot version ACKed, sync state, certificate expiry."""
    c = _client(ctx)
    resp = c.call("ListSidecars", pb.ListSidecarsRequest())
    now = time.time()
    issued = _issue_times(c) if any(s.cert_not_after_unix for s in resp.sidecars) else {}
    states = [meshctl_security.expiry_state(
        s.cert_not_after_unix, now,
        issued.get((s.service, s.instance, s.cert_not_after_unix), 0.0))
        for s in resp.sidecars]
    doc = [{"service": s.service, "instance": s.instance, "spiffe_id": s.spiffe_id,
            "inbound": s.inbound, "outbound": s.outbound, "admin": s.admin,
            "labels": dict(sorted(s.labels.items())), "health": s.health,
            "sent_version": s.sent_version, "acked_version": s.acked_version,
            "state": s.state, "connected": s.connected,
            "nack": ({"version": s.nack_version, "reason": s.nack_reason,
                      "at": _iso(s.nack_at_unix)} if s.nack_reason else None),
            "cert_not_after": _iso(s.cert_not_after_unix) if s.cert_not_after_unix else None,
            "cert_expiry": st or None,
            "last_seen": _iso(int(s.last_seen_unix)) if s.last_seen_unix else None}
           for s, st in zip(resp.sidecars, states, strict=True)]
    rows = []
    for d, s, st in zip(doc, resp.sidecars, states, strict=True):
        state = d["state"]
        if s.nack_reason and state == "NACKED":
            state = f"NACKED v{s.nack_version}: {s.nack_reason}"
        elif not s.connected:
            state = f"{state} (stream down {_age(s.last_seen_unix)})"
        rows.append([d["service"], d["instance"], d["inbound"] or "-", d["outbound"] or "-",
                     d["admin"] or "-", d["acked_version"] or "-", state,
                     meshctl_security.expiry_cell(s.cert_not_after_unix, st, now)
                     if s.cert_not_after_unix else "-"])
    _emit(ctx, output, doc, ["SERVICE", "INSTANCE", "INBOUND", "OUTBOUND", "ADMIN", "ACKED",
                             "STATE", "CERT NOT AFTER"], rows,
          title=f"latest snapshot version {resp.latest_version or '-'}"
          + _leader_note(resp))
    warning = meshctl_security.expiry_warning(
        [(f"{s.service}/{s.instance}", s.cert_not_after_unix, st)
         for s, st in zip(resp.sidecars, states, strict=True) if s.connected], now)
    if warning:
        click.echo(f"{PROG}: {warning}", err=True)


def _leader_note(resp: pb.ListSidecarsResponse) -> str:
    """``; control plane R (leader L)`` when the answer names its replica (several replicas
    on Consul: which one answered and which one signs), else ""."""
    if not resp.replica:
        return ""
    if resp.leader == resp.replica:
        return f"; control plane {resp.replica} (the leader)"
    return f"; control plane {resp.replica} (leader: {resp.leader or 'none elected yet'})"


def _issue_times(c: Client) -> dict[tuple[str, str, int], float]:
    """``(service, instance, not_after)`` -> when that certificate was issued (unix
    seconds), so status can tell a certificate's lifetime; empty when it cannot be asked."""
    try:
        certs = c.call("ListCertificates", pb.ListCertificatesRequest()).certificates
    except MeshctlError:
        return {}
    return {(x.service, x.instance_id, x.not_after_unix): float(x.issued_at_unix)
            for x in certs}


_LIMIT_COLUMNS = (("max_connections", "CONNECTIONS"), ("max_pending", "PENDING"),
                  ("max_requests", "REQUESTS"), ("max_retries", "RETRIES"))


@cli.command("breakers")
@click.option("--service", default="", metavar="S",
              help="Only the rows whose calling sidecar or upstream is service S.")
@_output
@click.pass_context
def breakers(ctx: click.Context, service: str, output: str) -> None:
    """Circuit breakers as the sidecars last reported them: one row per sidecar instance x
    upstream x endpoint (state, consecutive errors, ejections, seconds until HALF_OPEN), then
    per sidecar and upstream the limits in use against their maximum."""
    resp = _client(ctx).call("ListBreakers", pb.ListBreakersRequest(service=service))
    doc = {"endpoints": [{"instance": e.instance, "service": e.service, "upstream": e.upstream,
                          "endpoint": e.endpoint, "endpoint_instance": e.endpoint_instance,
                          "state": e.state, "consecutive_errors": e.consecutive_errors,
                          "ejections": e.ejections,
                          "half_open_in_s": round(e.half_open_in_s, 3),
                          "last_transition": (_iso(int(e.last_transition_unix))
                                              if e.last_transition_unix else None)}
                         for e in resp.endpoints],
           "limits": [{"instance": x.instance, "service": x.service, "upstream": x.upstream,
                       "limit": x.limit, "in_use": x.in_use, "max": x.max,
                       "fast_fails": x.fast_fails}
                      for x in resp.limits]}
    if output != "table":
        _emit(ctx, output, doc, [], [])
        return
    rows = [[e["instance"], e["upstream"],
             f"{e['endpoint_instance']} ({e['endpoint']})" if e["endpoint_instance"]
             else e["endpoint"], e["state"] or "-", str(e["consecutive_errors"]),
             str(e["ejections"]),
             f"{e['half_open_in_s']:.1f}s" if e["state"] == "OPEN" else "-",
             f"{_age(raw.last_transition_unix)} ago" if raw.last_transition_unix else "-"]
            for e, raw in zip(doc["endpoints"], resp.endpoints, strict=True)]
    _emit(ctx, output, doc, ["INSTANCE", "UPSTREAM", "ENDPOINT", "STATE", "CONSECUTIVE ERRORS",
                             "EJECTIONS", "HALF-OPEN IN", "LAST CHANGE"], rows,
          title="endpoints" + (f" (service {service})" if service else ""))
    per: dict[tuple[str, str], dict[str, str]] = {}
    refused: dict[tuple[str, str], int] = {}
    for x in doc["limits"]:
        key = (x["instance"], x["upstream"])
        per.setdefault(key, {})[x["limit"]] = f"{x['in_use']}/{x['max']}"
        refused[key] = refused.get(key, 0) + x["fast_fails"]
    known = {name for name, _ in _LIMIT_COLUMNS}
    others = sorted({x["limit"] for x in doc["limits"]} - known)
    columns = [*_LIMIT_COLUMNS, *((n, n.upper()) for n in others)]
    limit_rows = [[inst, up, *(cells.get(name, "-") for name, _ in columns),
                   str(refused[(inst, up)])]
                  for (inst, up), cells in per.items()]
    _emit(ctx, output, doc, ["INSTANCE", "UPSTREAM", *(title for _, title in columns),
                             "FAST-FAILS"], limit_rows, title="limits (in use/max)")


@cli.command("config")
@click.argument("instance")
@click.option("-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml",
              show_default=True, help="Output format.")
@click.pass_context
def config(ctx: click.Context, instance: str, output: str) -> None:
    """The snapshot INSTANCE holds (an instance id, or a service with one instance)."""
    resp = _client(ctx).call("GetSidecarConfig", pb.GetSidecarConfigRequest(instance=instance))
    try:
        held = json.loads(resp.json)
    except ValueError:
        raise MeshctlError(f"the sidecar {resp.instance} answered with invalid JSON") from None
    doc = {"service": resp.service, "instance": resp.instance, "version": resp.version,
           **(held if isinstance(held, dict) else {"snapshot": held})}
    _emit(ctx, output, doc, [], [])


# ---------------------------------------------------------------------- declarative config
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last one,
    silently)."""


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False
                    ) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable: construct_mapping says so
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                    key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return " ".join(f"{exc.problem}{where}".split())
    return " ".join(str(exc).split())


def load_documents(source: str, text: str) -> list[pb.ConfigDocument]:
    """The YAML documents of ``text`` (``---`` separated) as ``ConfigDocument`` (JSON), each
    with ``source`` and its position in it (from 1; empty documents count but are left out).
    Raises ``MeshctlError`` ``<source>: document <n>: invalid YAML: <problem> (line L,
    column C)``. Parsing only: the control plane validates."""
    out: list[pb.ConfigDocument] = []
    index = 0
    try:
        for body in yaml.load_all(text, Loader=_StrictLoader):
            index += 1
            if body is not None:
                out.append(pb.ConfigDocument(source=source, index=index,
                                             json=json.dumps(body, default=str)))
    except yaml.YAMLError as exc:
        raise MeshctlError(f"{source}: document {index + 1}: invalid YAML: "
                           f"{_yaml_reason(exc)}") from None
    return out


def read_documents(paths: tuple[str, ...]) -> list[pb.ConfigDocument]:
    """The documents of every ``-f`` path: a file, a directory (its ``*.yaml`` and ``*.yml``
    files, sorted by name) or ``-`` (stdin); raises ``MeshctlError`` for an unreadable path,
    invalid YAML or no documents at all."""
    files: list[tuple[str, str]] = []
    for p in paths:
        try:
            if p == "-":
                files.append(("<stdin>", sys.stdin.read()))
            elif Path(p).is_dir():
                found = sorted(f for f in Path(p).iterdir()
                               if f.suffix in (".yaml", ".yml") and f.is_file())
                if not found:
                    raise MeshctlError(f"{p}: no *.yaml or *.yml files in the directory")
                files += [(str(f), f.read_text()) for f in found]
            else:
                files.append((p, Path(p).read_text()))
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise MeshctlError(f"cannot read {p}: {reason}") from None
    docs = [d for source, text in files for d in load_documents(source, text)]
    if not docs:
        raise MeshctlError(f"no documents in {', '.join(paths)}")
    return docs


def _kind(text: str) -> str:
    try:
        return kind_of(text)
    except ConfigError as exc:
        raise MeshctlError(str(exc)) from None


def _label(kind: str, name: str) -> str:
    return f"{kind.lower()}/{name}"


_files = click.option("-f", "--filename", "paths", multiple=True, required=True,
                      metavar="FILE|DIR|-",
                      help="YAML documents: a file, a directory (*.yaml, *.yml) or - (stdin); "
                           "repeatable.")


@cli.command("apply")
@_files
@click.option("--dry-run", is_flag=True, default=False,
              help="Validate and say what would change; store nothing.")
@click.pass_context
def apply(ctx: click.Context, paths: tuple[str, ...], dry_run: bool) -> None:
    """Apply Route, TrafficPolicy, Fault and AuthorizationPolicy documents: validated whole
    (with what is stored) before any of it is stored; one line per object."""
    docs = read_documents(paths)
    resp = _client(ctx).call("ApplyConfig", pb.ApplyConfigRequest(documents=docs,
                                                                   dry_run=dry_run),
                             bare=(grpc.StatusCode.INVALID_ARGUMENT,))
    for r in resp.results:
        click.echo(f"{_label(r.kind, r.name)} {r.action} (revision {r.revision}"
                   f"{', dry run' if dry_run else ''})")


@cli.command("get")
@click.argument("kind")
@click.argument("name", required=False, default="")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table",
              show_default=True,
              help="Output format (yaml: documents that apply -f takes back).")
@click.option("--revision", type=click.IntRange(min=1), default=None,
              help="That revision of NAME instead of the current one.")
@click.pass_context
def get(ctx: click.Context, kind: str, name: str, output: str, revision: int | None) -> None:
    """Config objects of KIND (route, trafficpolicy, fault, authorizationpolicy; plural too),
    or NAME's. ``-o yaml``: documents that ``apply -f`` takes back (a revision's restores
    it); ``-o json``: an object for NAME, else a list, each with revision, applied_at and
    deleted."""
    kind = _kind(kind)
    if revision is not None and not name:
        raise click.UsageError("--revision needs a NAME")
    resp = _client(ctx).call("GetConfig", pb.GetConfigRequest(kind=kind, name=name,
                                                               revision=revision or 0))
    objs = [(o, json.loads(o.json)) for o in resp.objects]
    if output == "yaml":
        texts = []
        for o, doc in objs:
            note = ("; deleted at this revision (apply restores it)" if o.deleted else "")
            texts.append(f"# {_label(o.kind, o.name)} revision {o.revision}, applied "
                         f"{_iso(int(o.applied_at_unix))}{note}\n"
                         f"{to_yaml(doc)}")
        click.echo("---\n".join(texts), nl=False)
        return
    rows = [{**doc, "revision": o.revision, "applied_at": _iso(int(o.applied_at_unix)),
             "deleted": o.deleted} for o, doc in objs]
    if output == "json":
        click.echo(json.dumps(rows[0] if name and rows else rows, indent=2))
        return
    _emit(ctx, output, rows, ["KIND", "NAME", "SERVICE", "REVISION", "APPLIED"],
          [[r["kind"], r["name"], str(r["spec"].get("service", "")),
            f"{r['revision']}{' (deleted)' if r['deleted'] else ''}", r["applied_at"]]
           for r in rows])


@cli.command("delete")
@click.argument("kind")
@click.argument("name")
@click.pass_context
def delete(ctx: click.Context, kind: str, name: str) -> None:
    """Delete the config object KIND NAME (its revisions stay: get --revision)."""
    resp = _client(ctx).call("DeleteConfig", pb.DeleteConfigRequest(kind=_kind(kind),
                                                                     name=name))
    r = resp.result
    click.echo(f"{_label(r.kind, r.name)} deleted (revision {r.revision})")


@cli.command("diff")
@_files
@click.pass_context
def diff(ctx: click.Context, paths: tuple[str, ...]) -> None:
    """What applying the documents would change: a unified diff of the canonical YAML per
    object ("no changes" when none). Validated like apply; exits 0 unless it fails."""
    docs = read_documents(paths)
    resp = _client(ctx).call("DiffConfig", pb.DiffConfigRequest(documents=docs),
                             bare=(grpc.StatusCode.INVALID_ARGUMENT,))
    changed = False
    for d in resp.diffs:
        if d.action == UNCHANGED:
            continue
        changed = True
        label = _label(d.kind, d.name)
        before = f"{label} (revision {d.current_revision})" if d.current_yaml else "/dev/null"
        click.echo("".join(difflib.unified_diff(
            d.current_yaml.splitlines(keepends=True), d.proposed_yaml.splitlines(keepends=True),
            before, f"{label} (proposed)")), nl=False)
    if not changed:
        click.echo("no changes")


@cli.group("fault")
def fault() -> None:
    """Inject faults into calls to a service, and clear them (Fault objects named after the
    service)."""


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


@fault.command("inject")
@click.argument("service")
@click.option("--method", default=None, metavar="M",
              help="Only this gRPC method: /pkg.Service/Method (exact) or a prefix ending in "
                   "'/' (default: every method).")
@click.option("--abort", "abort_code", default=None, metavar="CODE",
              help="Abort with this gRPC status (name like UNAVAILABLE, or number).")
@click.option("--delay", "delay_ms", type=click.IntRange(1, 600_000), default=None,
              metavar="MS", help="Delay calls by this many milliseconds.")
@click.option("--percent", type=FiniteFloatRange(0, 100), default=None, metavar="P",
              help="Share of calls (percent) for the abort and the delay.")
@click.option("--abort-percent", type=FiniteFloatRange(0, 100), default=None, metavar="P",
              help="Share of calls for the abort (instead of --percent).")
@click.option("--delay-percent", type=FiniteFloatRange(0, 100), default=None, metavar="P",
              help="Share of calls for the delay (instead of --percent).")
@click.pass_context
def fault_inject(ctx: click.Context, service: str, method: str | None, abort_code: str | None,
                 delay_ms: int | None, percent: float | None, abort_percent: float | None,
                 delay_percent: float | None) -> None:
    """Write the Fault named SERVICE (replacing it): an abort and/or a delay for a share of
    the calls to SERVICE."""
    if abort_code is None and delay_ms is None:
        raise click.UsageError("give --abort CODE and/or --delay MS, with --percent P")
    try:
        check_name(service)
    except ConfigError as exc:
        raise MeshctlError(f"cannot name a Fault after service {service!r} ({exc}): apply a "
                           "Fault document with another name instead") from None
    spec: dict[str, Any] = {"service": service}
    if method:
        spec["method"] = {"prefix": method} if method.endswith("/") else {"exact": method}
    for key, given, own in (("delay", delay_ms, delay_percent), ("abort", abort_code,
                                                                 abort_percent)):
        if given is None:
            continue
        share = own if own is not None else percent
        if share is None:
            raise click.UsageError(f"--{key} needs --percent P (or --{key}-percent P)")
        value: Any = given
        if key == "abort":
            value = int(given) if given.isdigit() else given.upper()
        spec[key] = {"ms" if key == "delay" else "code": value, "percent": _number(share)}
    doc = {"kind": "Fault", "name": service, "spec": spec}
    resp = _client(ctx).call("ApplyConfig", pb.ApplyConfigRequest(documents=[
        pb.ConfigDocument(source="fault inject", json=json.dumps(doc))]),
        bare=(grpc.StatusCode.INVALID_ARGUMENT,))
    for r in resp.results:
        click.echo(f"{_label(r.kind, r.name)} {r.action} (revision {r.revision})")


@fault.command("clear")
@click.argument("service")
@click.pass_context
def fault_clear(ctx: click.Context, service: str) -> None:
    """Delete the Fault named SERVICE (what ``fault inject SERVICE`` wrote)."""
    try:
        resp = _client(ctx).call("DeleteConfig", pb.DeleteConfigRequest(kind="Fault",
                                                                         name=service))
    except RpcFailed as exc:
        if exc.code == grpc.StatusCode.NOT_FOUND:
            raise MeshctlError(f"no fault injected into {service} (no Fault named "
                               f"{service!r})") from None
        raise
    r = resp.result
    click.echo(f"{_label(r.kind, r.name)} deleted (revision {r.revision})")


for _command in meshctl_observe.COMMANDS + meshctl_security.COMMANDS:
    cli.add_command(_command)
for _command in meshctl_authz.COMMANDS:
    cli.add_command(_command)
for _command in meshctl_security.CERTS_COMMANDS:
    certs.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: errors are one line on stderr and a non-zero exit."""
    try:
        code = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"{PROG}: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except MeshctlError as exc:
        click.echo(f"{PROG}: error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"{PROG}: error: {exc}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
