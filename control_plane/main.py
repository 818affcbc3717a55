"""``mesh-control-plane``: run the control plane (the mesh's CA, join tokens, registry and
discovery, admin API)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import os
import re
import resource
import signal
import stat
import sys
from pathlib import Path

import click
import prometheus_client
from click.core import ParameterSource

from control_plane import ca as ca_mod
from control_plane import rotation as rotation_mod
from control_plane.consul_conn import ConsulConfigError, parse_registry_url, target_from_env
from control_plane.discovery import DiscoverySettings
from control_plane.kvstore import open_state_store
from control_plane.leader import (
    DEFAULT_LOCK_DELAY_S,
    DEFAULT_SESSION_TTL_S,
    MAX_LOCK_DELAY_S,
    MAX_SESSION_TTL_S,
    MIN_SESSION_TTL_S,
    ConsulLeadership,
)
from control_plane.registry.consul import validate_prefix
from control_plane.server import (
    DEFAULT_HANDSHAKE_TIMEOUT_S,
    DEFAULT_STREAM_STALL_TIMEOUT_S,
    ControlPlane,
    Server,
    make_registry,
    split_hostport,
)
from control_plane.store import Store
from control_plane.traces import TRACES_FILE, TraceStore
from mesh_common.numbers import FiniteFloatRange
from mesh_common.spiffe import SpiffeError, SpiffeId

PROG = "mesh-control-plane"
log = logging.getLogger("mesh.control_plane")
MAX_OPEN_FILES = 1 << 20
"""The soft open-files limit is raised at most to this when the hard limit is unlimited."""


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit (at most
    ``MAX_OPEN_FILES`` when the hard one is unlimited), so thousands of connections (idle
    ones too) cannot exhaust the descriptors before the servers' own bounds apply. Returns
    (soft before, soft after); logs the change, or a warning when the kernel refuses it (the
    old limit stays). Never raises."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft >= target:
        log.info("open files limit: %d (the hard limit)", soft)
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("open files limit stays %d: cannot raise it to %d (%s)", soft, target, exc)
        return soft, soft
    log.info("open files limit raised from %d to %d (hard limit %s)", soft, target,
             "unlimited" if hard == resource.RLIM_INFINITY else hard)
    return soft, target


def _address(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        split_hostport(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _optional_address(ctx: click.Context, param: click.Parameter, value: str) -> str:
    return _address(ctx, param, value) if value else ""


def _registry_spec(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value == "embedded":
        return value
    try:
        parse_registry_url(value)
    except ConsulConfigError as exc:
        raise click.BadParameter(f"embedded, or {exc}") from None
    return value


def _consul_prefix(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return validate_prefix(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _advertise_host(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--advertise-host``: an IP address or a DNS name (no port, no brackets)."""
    if not value:
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME_RE.match(value):
            raise click.BadParameter(f"expected an IP address or a host name, got {value!r}") \
                from None
        return value
    if ip.is_unspecified:
        raise click.BadParameter(f"{value} is not an address other hosts can reach")
    return value


def check_ca_key_mode(path: Path) -> None:
    """Refuse a CA key file that others may read: group or other permission bits set (mode
    0600 or stricter, as ssh refuses a private key). Raises click.BadParameter naming the
    file and its mode; an unreadable path is left for the CA's loading to report."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return
    if mode & 0o077:
        raise click.BadParameter(f"{path} has mode {mode:04o}: the CA key must be readable "
                                 f"by its owner only (chmod 600 {path})",
                                 param_hint="--ca-key")


def load_ca(ca_dir: Path, trust_domain: str, ca_cert: str | None, ca_key: str | None,
            now: dt.datetime) -> ca_mod.CertificateAuthority:
    """The root under ``ca_dir`` (created on first start), or an organisation's intermediate
    (``--ca-cert/--ca-key``); meshctl's admin credentials and the bundle land in ``ca_dir``."""
    if not ca_cert and not ca_key:
        return ca_mod.load_or_create(ca_dir, trust_domain, now)
    if not (ca_cert and ca_key):
        raise click.UsageError("--ca-cert and --ca-key go together")
    ca = ca_mod.load(Path(ca_cert), Path(ca_key), trust_domain)
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ca_dir / ca_mod.CA_CERT_FILE).write_bytes(ca.bundle_pem)
    if not (ca_dir / ca_mod.ADMIN_KEY_FILE).exists():
        issued, key_pem = ca.issue_keypair(ca_mod.admin_spiffe_id(trust_domain, "meshctl"),
                                           "meshctl", now, ca_mod.ROOT_VALIDITY)
        ca_mod._write_private(ca_dir / ca_mod.ADMIN_KEY_FILE, key_pem)
        ca_mod._write_private(ca_dir / ca_mod.ADMIN_CERT_FILE, issued.pem)
    return ca


async def _serve(cp: ControlPlane, listen: str, bootstrap_listen: str, *,
                 admin_http: str | None = None, admin_http_optional: bool = False,
                 otlp_listen: str | None = None, otlp_optional: bool = False,
                 handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
                 advertise_host: str | None = None) -> int:
    server = Server(cp, listen, bootstrap_listen, admin_http=admin_http,
                    admin_http_optional=admin_http_optional, otlp_listen=otlp_listen,
                    otlp_optional=otlp_optional, handshake_timeout_s=handshake_timeout_s,
                    advertise_host=advertise_host)
    ready = await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(json.dumps({"ready": ready}) + "\n")
    sys.stdout.flush()
    log.info("%s serving API on %s (mTLS), join on %s", PROG, ready["listen"], ready["bootstrap"])
    if ready.get("admin_http"):
        log.info("%s admin HTTP (metrics, dashboard) on http://%s/", PROG, ready["admin_http"])
    if ready.get("otlp"):
        log.info("%s OTLP trace receiver on %s (mTLS)", PROG, ready["otlp"])
    await stop.wait()
    log.info("%s stopping", PROG)
    await server.stop()  # ends the streams and the background tasks, saves the registry
    return 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--listen", default="127.0.0.1:15010", show_default=True, callback=_address,
              help="API listener (mTLS, client certificate from the mesh CA required).")
@click.option("--bootstrap-listen", default="127.0.0.1:15011", show_default=True,
              callback=_address, help="Join listener (plaintext, the Join RPC only).")
@click.option("--admin-http", default="127.0.0.1:15014", show_default=True, callback=_address,
              help="Admin HTTP port (plaintext, read-only): /metrics, the dashboard at /, "
                   "/api/topology, /topology.svg. Port 0 = any free port. When the default "
                   "is taken the control plane runs without it (a warning).")
@click.option("--otlp-listen", default="127.0.0.1:15012", show_default=True,
              callback=_optional_address,
              help="The embedded OTLP/gRPC trace receiver (mTLS like the API; sidecars send "
                   "their spans there by default). Port 0 = any free port; \"\" = none. When "
                   "the default is taken the control plane runs without it (a warning).")
@click.option("--trace-retention-s", type=FiniteFloatRange(1, 30 * 24 * 3600), default=3600.0,
              show_default=True, help="Traces older than this (by their last span received) "
                                      "are dropped.")
@click.option("--trace-max-spans", type=click.IntRange(1, 100_000_000), default=100_000,
              show_default=True, help="At most this many spans are kept (oldest traces are "
                                      "dropped first).")
@click.option("--trust-domain", default="mesh.local", show_default=True)
@click.option("--ca-dir", default="certs", show_default=True,
              type=click.Path(file_okay=False), help="CA material and meshctl's admin credentials.")
@click.option("--ca-cert", type=click.Path(dir_okay=False), default=None,
              help="An intermediate CA certificate (file may carry its chain) instead of the root.")
@click.option("--ca-key", type=click.Path(dir_okay=False), default=None,
              help="The intermediate's private key (with --ca-cert).")
@click.option("--data-dir", default=".mesh/control-plane", show_default=True,
              type=click.Path(file_okay=False), help="State (SQLite): tokens, issued certificates, the registry, config revisions; "
                   "the OTLP receiver's traces in their own file (traces.sqlite).")
@click.option("--cert-ttl", type=click.IntRange(5, 30 * 24 * 3600), default=3600,
              show_default=True, help="Lifetime of workload certificates, in seconds.")
@click.option("--grace-period-s", type=FiniteFloatRange(0, 24 * 3600), default=10.0,
              show_default=True,
              help="An instance whose stream is down this long leaves the registry (after a "
                   "restart, counted from the restart).")
@click.option("--push-window-ms", type=click.IntRange(0, 60_000), default=100,
              show_default=True,
              help="A change is pushed at once; changes within this window after a push are "
                   "coalesced into one push at its end.")
@click.option("--report-window-s", type=FiniteFloatRange(1, 3600), default=60.0,
              show_default=True, help="How long sidecars' state reports are kept (topology).")
@click.option("--stale-after-s", type=FiniteFloatRange(0.1, 3600), default=10.0,
              show_default=True,
              help="A sidecar that has not ACKed the version sent this long is STALE.")
@click.option("--ca-rotation-phase-timeout-s", type=FiniteFloatRange(1, 7 * 24 * 3600),
              default=600.0, show_default=True,
              help="A CA rotation's phase not done by then is reported stuck (meshctl ca "
                   "status names the sidecars behind); the rotation keeps waiting.")
@click.option("--ca-rotation-min-phase-s", type=FiniteFloatRange(0, 24 * 3600), default=5.0,
              show_default=True, help="Each phase of a CA rotation lasts at least this long.")
@click.option("--ca-rotation-retell-s", type=FiniteFloatRange(0.1, 3600), default=10.0,
              show_default=True,
              help="During a CA rotation, a sidecar still behind is told to renew again this "
                   "often.")
@click.option("--handshake-timeout-s", type=FiniteFloatRange(0.1, 600),
              default=DEFAULT_HANDSHAKE_TIMEOUT_S, show_default=True,
              help="A new connection to the API or join listener must finish its TLS handshake "
                   "and send its HTTP/2 preface within this, else it is closed.")
@click.option("--stream-stall-timeout-s", type=FiniteFloatRange(0.1, 24 * 3600),
              default=DEFAULT_STREAM_STALL_TIMEOUT_S, show_default=True,
              help="A discovery stream whose sidecar stops reading (a message waits this long "
                   "to be written) is ended and counted.")
@click.option("--registry", "registry_spec", default="embedded", show_default=True,
              callback=_registry_spec,
              help="Where instances are registered: embedded (in the data dir) or "
                   "consul://HOST:PORT (consuls:// for HTTPS; tokens, certificate records, "
                   "revocations, audit log, config and snapshot versions then live in "
                   "Consul's KV too, shared by every replica); the token comes from "
                   "CONSUL_HTTP_TOKEN, TLS from CONSUL_CACERT, CONSUL_CLIENT_CERT, "
                   "CONSUL_CLIENT_KEY and CONSUL_HTTP_SSL_VERIFY.")
@click.option("--consul-prefix", default="mesh", show_default=True, callback=_consul_prefix,
              help="This mesh's namespace in Consul (service IDs and meta, KV keys under "
                   "PREFIX/), for several meshes on one Consul.")
@click.option("--advertise-host", default=None, callback=_advertise_host, metavar="HOST",
              help="The address or host name other hosts reach this control plane at: join "
                   "tokens, join answers and the leader election name it, and the serving "
                   "certificate covers it (default: each listener's own host; give it when "
                   "listening on 0.0.0.0).")
@click.option("--leader-ttl-s", type=FiniteFloatRange(MIN_SESSION_TTL_S, MAX_SESSION_TTL_S),
              default=DEFAULT_SESSION_TTL_S, show_default=True,
              help="With --registry consul://: the TTL of this replica's Consul session "
                   "behind the leader lock (renewed every third of it). A leader that cannot "
                   "renew for this long stops signing; one that dies is replaced after it "
                   "(Consul may take up to twice it) plus the lock-delay.")
@click.option("--leader-lock-delay-s", type=FiniteFloatRange(0, MAX_LOCK_DELAY_S),
              default=DEFAULT_LOCK_DELAY_S, show_default=True,
              help="With --registry consul://: the session's lock-delay, how long the leader "
                   "lock stays free after Consul invalidated its holder's session (a clean "
                   "stop releases it without one).")
@click.option("--enable-test-hooks", is_flag=True, default=False,
              help="TEST ONLY: serve Admin.TestPushRawSnapshot (pushes unvalidated snapshots).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
def cli(listen: str, bootstrap_listen: str, admin_http: str, otlp_listen: str,
        trace_retention_s: float, trace_max_spans: int, trust_domain: str, ca_dir: str,
        ca_cert: str | None,
        ca_key: str | None, data_dir: str, cert_ttl: int, grace_period_s: float,
        push_window_ms: int, report_window_s: float, stale_after_s: float,
        ca_rotation_phase_timeout_s: float, ca_rotation_min_phase_s: float,
        ca_rotation_retell_s: float, handshake_timeout_s: float, stream_stall_timeout_s: float,
        registry_spec: str, consul_prefix: str, advertise_host: str | None,
        leader_ttl_s: float, leader_lock_delay_s: float, enable_test_hooks: bool,
        log_level: str) -> int:
    """Run the mesh control plane: certificate authority, join tokens, registry and
    discovery, admin API."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prometheus_client.disable_created_metrics()  # no *_created series next to the counters
    raise_open_files_limit()
    admin_http_optional = (click.get_current_context().get_parameter_source("admin_http")
                           is ParameterSource.DEFAULT)
    otlp_optional = (click.get_current_context().get_parameter_source("otlp_listen")
                     is ParameterSource.DEFAULT)
    try:
        SpiffeId(trust_domain, "x")
    except SpiffeError as exc:
        raise click.BadParameter(str(exc), param_hint="--trust-domain") from None
    now = dt.datetime.now(dt.UTC)
    if bool(ca_cert) != bool(ca_key):
        raise click.UsageError("--ca-cert and --ca-key go together")
    if ca_key:
        check_ca_key_mode(Path(ca_key))
    # The CA dir's rotation state decides: none (the root there, or --ca-cert/--ca-key), a
    # rotation under way (both CAs), or a finished one (the CA it brought).
    restored = rotation_mod.restore(
        Path(ca_dir), trust_domain, lambda: load_ca(Path(ca_dir), trust_domain, ca_cert, ca_key,
                                                    now),
        Path(ca_cert) if ca_cert else None, Path(ca_key) if ca_key else None)
    if restored.note:
        log.warning("%s", restored.note)
    rotation = rotation_mod.RotationManager(
        restored, ca_dir=Path(ca_dir), settings=rotation_mod.RotationSettings(
            phase_timeout_s=ca_rotation_phase_timeout_s, min_phase_s=ca_rotation_min_phase_s,
            retell_s=ca_rotation_retell_s))
    ca = rotation.trust.signer
    store = Store(Path(data_dir))
    settings = DiscoverySettings(grace_period_s=grace_period_s,
                                 push_window_s=push_window_ms / 1000,
                                 report_window_s=report_window_s, stale_after_s=stale_after_s,
                                 test_hooks=enable_test_hooks)
    if enable_test_hooks:
        log.warning("TEST HOOKS ARE ON: Admin.TestPushRawSnapshot pushes unvalidated snapshots")
    traces = TraceStore(Path(data_dir) / TRACES_FILE, trace_retention_s, trace_max_spans) \
        if otlp_listen else None
    registry = make_registry(registry_spec, store, grace_period_s, now.timestamp(),
                             consul_prefix=consul_prefix)
    # With --registry consul://... the tokens, certificates, audit log, config and versions
    # live in Consul's KV too (kvstore.ConsulStore), shared by every replica.
    state = open_state_store(registry_spec, store, consul_prefix)
    log.info("state: %s", state.describe())
    cp = ControlPlane(ca, state, dt.timedelta(seconds=cert_ttl), settings=settings,
                      traces=traces, rotation=rotation, registry=registry,
                      stream_stall_timeout_s=stream_stall_timeout_s)
    replica_id = getattr(registry, "replica_id", "")
    if registry_spec != "embedded":
        # Several replicas: one leader signs (control_plane.leader), the others forward.
        if not ca_cert:
            log.warning("several control-plane replicas need one CA: give every replica the "
                        "same --ca-cert/--ca-key files (this one uses the root in %s)", ca_dir)
        cp.leadership = ConsulLeadership(target_from_env(registry_spec, os.environ),
                                         consul_prefix, replica_id, ttl_s=leader_ttl_s,
                                         lock_delay_s=leader_lock_delay_s)
    return asyncio.run(_serve(cp, listen, bootstrap_listen, admin_http=admin_http,
                              admin_http_optional=admin_http_optional,
                              otlp_listen=otlp_listen or None, otlp_optional=otlp_optional,
                              handshake_timeout_s=handshake_timeout_s,
                              advertise_host=advertise_host))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: errors are one line on stderr and a non-zero exit."""
    try:
        code = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.ClickException as exc:
        click.echo(f"{PROG}: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except (OSError, ValueError) as exc:
        click.echo(f"{PROG}: error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:  # sqlite3.Error and friends: still one line
        click.echo(f"{PROG}: error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
