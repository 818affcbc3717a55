"""``mesh-sidecar``: run one sidecar.

Standalone mode: ``--config FILE`` (certificate files named in it). Dynamic mode:
``--service NAME --token T|--token-file F [--app HOST:PORT] [--config FILE]``: the identity
comes from the control plane (joined with the token, renewed over mTLS), and so do the
upstream clusters (``sidecar.discovery``); the optional config gives listeners, static
clusters and limits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import click
import uvloop
import yaml

from mesh_common.bootstrap import Bootstrap, ConfigError, HostPort, parse_bootstrap, parse_hostport
from mesh_common.limits import Limits
from mesh_common.numbers import FiniteFloatRange
from mesh_common.snapshot import Snapshot
from mesh_common.spiffe import SpiffeError, SpiffeId

from .layers.balance import DECAY_S
from .malloc import tune_malloc
from .process import Sidecar, TracingOptions

PROG = "mesh-sidecar"


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None


def load_config(path: str) -> Bootstrap:
    """Read and validate the standalone config; raises ConfigError with the file named."""
    doc = _read_yaml(path)
    try:
        return parse_bootstrap(doc)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def dynamic_bootstrap(service: str, trust_domain: str, app: str | None,
                      path: str | None) -> Bootstrap:
    """Dynamic mode's listeners, clusters and limits: from ``path`` (no ``tls`` section; its
    ``service``/``trust_domain``, when present, must agree with the flags) or the defaults
    (inbound 127.0.0.1:15006 when there is an app, outbound 127.0.0.1:15001, admin
    127.0.0.1:15000, no clusters). Raises ConfigError."""
    try:
        SpiffeId(trust_domain, service)
    except SpiffeError as exc:
        raise ConfigError(f"--service/--trust-domain: {exc}") from None
    app_hp = parse_hostport(app, "--app", loopback_only=True) if app is not None else None
    if path is None:
        boot = Bootstrap(service=service, trust_domain=trust_domain, cert_file="", key_file="",
                         ca_file="", inbound=HostPort("127.0.0.1", 15006) if app_hp else None,
                         app=app_hp, outbound=HostPort("127.0.0.1", 15001),
                         admin=HostPort("127.0.0.1", 15000), limits=Limits(),
                         snapshot=Snapshot(version="dynamic-0", clusters=()))
        return boot
    doc = _read_yaml(path)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: config: expected a mapping at the top level")
    doc = dict(doc)
    for key, flag, value in (("service", "--service", service),
                             ("trust_domain", "--trust-domain", trust_domain)):
        if doc.setdefault(key, value) != value:
            raise ConfigError(f"{path}: {key}: {doc[key]!r} disagrees with {flag} {value!r}")
    if app is not None:
        inbound = doc.get("inbound")
        if inbound is None:
            doc["inbound"] = {"listen": "127.0.0.1:15006", "app": app}
        elif isinstance(inbound, dict) and inbound.get("app", app) != app:
            raise ConfigError(f"{path}: inbound.app: {inbound['app']!r} disagrees with "
                              f"--app {app!r}")
        elif isinstance(inbound, dict):
            doc["inbound"] = {**inbound, "app": app}
    try:
        boot = parse_bootstrap(doc, require_tls=False)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return dataclasses.replace(boot, snapshot=Snapshot(version="dynamic-0",
                                                       clusters=boot.snapshot.clusters))


async def _serve(boot: Bootstrap, ports: dict[str, int | None], drain_timeout_s: float,
                 cert_poll_s: float, *, access_log: str | None = None,
                 tracing: TracingOptions | None = None, ewma_decay_s: float = DECAY_S) -> int:
    sidecar = Sidecar(boot, drain_timeout_s=drain_timeout_s, cert_poll_s=cert_poll_s,
                      access_log=access_log, tracing=tracing, ewma_decay_s=ewma_decay_s)
    bound = await sidecar.start(inbound_port=ports["inbound"], outbound_port=ports["outbound"],
                                admin_port=ports["admin"])
    sys.stdout.write(json.dumps({"ready": bound}) + "\n")
    sys.stdout.flush()
    logging.getLogger("mesh.sidecar").info("%s serving %s as %s", PROG, bound, boot.spiffe_id)
    await sidecar.wait_stopped()
    return 0


class UsageError(click.UsageError):
    """Standalone and dynamic flags mixed wrongly: one line, exit 2."""


def _read_token(token: str | None, token_file: str | None) -> str:
    if token is not None and token_file is not None:
        raise UsageError("give either --token or --token-file, not both")
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as exc:
            raise UsageError(f"--token-file: cannot read {token_file}: {exc.strerror}") from None
    assert token is not None
    return token


_LABEL_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./")


def parse_labels(values: Sequence[str]) -> dict[str, str]:
    """``--label KEY=VALUE`` flags into a mapping. Keys are 1-63 of ``[A-Za-z0-9-_./]`` (as in
    snapshots), values at most 253 characters; raises UsageError (one line) on a bad form or a
    key given twice."""
    labels: dict[str, str] = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep:
            raise UsageError(f"--label: expected KEY=VALUE, got {text!r}")
        if not (0 < len(key) <= 63 and set(key) <= _LABEL_KEY_CHARS):
            raise UsageError(f"--label: bad key {key!r} in {text!r} (1-63 of A-Z a-z 0-9 - _ . /)")
        if len(value) > 253 or not value.isprintable():
            raise UsageError(f"--label: the value of {key!r} must be at most 253 printable "
                             "characters")
        if key in labels:
            raise UsageError(f"--label: {key!r} given twice")
        labels[key] = value
    return labels


def parse_control_planes(value: str, flag: str = "--control-plane") -> list[str]:
    """A comma-separated list of ``HOST:PORT`` (blanks around commas allowed) into a list;
    raises UsageError naming the bad entry."""
    addresses = [part.strip() for part in value.split(",")]
    if not any(addresses) or not all(addresses):
        raise UsageError(f"{flag}: expected HOST:PORT[,HOST:PORT...], got {value!r}")
    for address in addresses:
        try:
            parse_hostport(address, flag)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    return addresses


def check_instance_id(value: str) -> str:
    """An instance id: 1-253 printable characters without blanks; raises UsageError."""
    if not (0 < len(value) <= 253) or not value.isprintable() or any(c.isspace() for c in value):
        raise UsageError(f"--instance-id: expected 1-253 printable characters without blanks, "
                         f"got {value!r}")
    return value


def check_writable(path: str, flag: str) -> None:
    """``path`` can be opened for appending (it is created when missing); raises UsageError
    naming ``flag`` and the reason."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644))
    except OSError as exc:
        raise UsageError(f"{flag}: cannot write {path}: {exc.strerror}") from None


@dataclasses.dataclass(frozen=True)
class DynamicOptions:
    token: Any  # a JoinToken (never logged: its repr hides the secret)
    join_addresses: tuple[str, ...]  # () = the token's
    api_addresses: tuple[str, ...]  # () = the token's
    health_check: str
    health_interval_s: float
    instance_id: str | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    report_interval_s: float = 5.0
    max_backoff_s: float = 5.0


class JoinFailed(Exception):
    """Joining was refused or its answer could not be trusted: one line, exit 1."""


async def _serve_dynamic(boot: Bootstrap, opts: DynamicOptions, ports: dict[str, int | None],
                         drain_timeout_s: float, cert_poll_s: float, *,
                         access_log: str | None = None,
                         tracing: TracingOptions | None = None,
                         ewma_decay_s: float = DECAY_S) -> int:
    from .discovery import for_dynamic_sidecar
    from .dynamic import DynamicIdentity, JoinRefused
    from .health import AppHealth
    from .tls import TlsState

    log = logging.getLogger("mesh.sidecar")
    identity = DynamicIdentity(opts.token, boot.service, boot.trust_domain,
                               join_address=list(opts.join_addresses) or None,
                               api_address=list(opts.api_addresses) or None,
                               instance_id=opts.instance_id, max_backoff_s=opts.max_backoff_s)
    log.info("joining the mesh as %s via %s", boot.spiffe_id, identity.join_address)
    # SIGTERM while still waiting for the control plane: stop trying, exit 0 (the sidecar's
    # own handlers replace these once it serves).
    loop = asyncio.get_running_loop()
    joining = asyncio.current_task()
    assert joining is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, joining.cancel)
    try:
        await identity.join()
    except JoinRefused as exc:
        identity.close()
        raise JoinFailed(str(exc)) from None
    except asyncio.CancelledError:
        identity.close()
        log.info("stopped before joining the mesh")
        return 0
    tasks: list[asyncio.Task[None]] = []
    try:
        tls = TlsState(identity.files)
        identity.on_new_files = tls.swap
        # In-memory files never change under us: no file poll in dynamic mode.
        tracing = _dynamic_tracing(tracing or TracingOptions(), identity)
        sidecar = Sidecar(boot, drain_timeout_s=drain_timeout_s, cert_poll_s=0, tls=tls,
                          access_log=access_log, tracing=tracing, ewma_decay_s=ewma_decay_s)
        sidecar.ready_checks.append(identity.not_ready_reason)
        sidecar.stats_sections["identity"] = identity.stats
        bound = await sidecar.start(inbound_port=ports["inbound"],
                                    outbound_port=ports["outbound"], admin_port=ports["admin"])
        tasks.append(asyncio.create_task(identity.renew_forever(), name="renew"))
        health = None
        if boot.app is not None:
            health = AppHealth(boot.app, opts.health_check, opts.health_interval_s)
            sidecar.stats_sections["app_health"] = health.stats
            tasks.append(asyncio.create_task(health.run(), name="app-health"))
        # Registers once the app's first health check is in; on SIGTERM it reports
        # NOT_SERVING while the sidecar drains, and is cancelled after.
        discovery = for_dynamic_sidecar(sidecar, identity, health, bound=bound,
                                        labels=opts.labels, addresses=identity.api_addresses,
                                        report_interval_s=opts.report_interval_s,
                                        max_backoff_s=opts.max_backoff_s)
        sidecar.stats_sections["discovery"] = discovery.stats
        tasks.append(asyncio.create_task(discovery.run(), name="discovery"))
        sys.stdout.write(json.dumps({"ready": bound}) + "\n")
        sys.stdout.flush()
        log.info("%s serving %s as %s", PROG, bound, boot.spiffe_id)
        await sidecar.wait_stopped()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        identity.close()
    return 0


def _dynamic_tracing(opts: TracingOptions, identity: Any) -> TracingOptions:
    """Dynamic mode's tracing: ``--otlp-endpoint``, else the control plane's receiver named
    in the join answer ("" = none: nothing is exported); mTLS with the identity's current
    in-memory files (asked for before each export batch, so a renewed certificate is used);
    the identity's instance id."""
    return dataclasses.replace(opts, otlp_endpoint=opts.otlp_endpoint or identity.otlp_endpoint
                               or None, tls=lambda: identity.files,
                               instance_id=opts.instance_id or identity.instance_id)


def check_otlp_endpoint(value: str) -> str:
    """``--otlp-endpoint``: ``HOST:PORT`` or ``http://HOST:PORT``; raises UsageError."""
    from .tracing import parse_otlp_endpoint
    try:
        parse_otlp_endpoint(value)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Config (YAML). Alone: standalone mode (service, tls, inbound, outbound, "
                   "clusters, limits). With --token: listeners, clusters and limits only.")
@click.option("--service", default=None,
              help="Dynamic mode: this instance's service name (the SPIFFE ID's last part).")
@click.option("--app", default=None, metavar="HOST:PORT",
              help="Dynamic mode: the local app (h2c, loopback); omit for an outbound-only "
                   "sidecar.")
@click.option("--token", default=None, help="Dynamic mode: a join token (meshctl token create).")
@click.option("--token-file", default=None, type=click.Path(dir_okay=False),
              help="Dynamic mode: a file holding the join token.")
@click.option("--control-plane", default=None, metavar="HOST:PORT[,HOST:PORT...]",
              help="Dynamic mode: the control plane's API addresses, tried in turn (default: "
                   "MESH_CONTROL_PLANE, else the token's).")
@click.option("--bootstrap-address", default=None, metavar="HOST:PORT[,HOST:PORT...]",
              help="Dynamic mode: the control plane's join addresses (one per control-plane "
                   "replica), tried in turn (default: the token's).")
@click.option("--trust-domain", default=None,
              help="Dynamic mode: the SPIFFE trust domain (default mesh.local).")
@click.option("--health-check", type=click.Choice(["grpc", "tcp", "none"]), default=None,
              help="Dynamic mode: how to check the local app (default grpc; an app without "
                   "grpc.health.v1 is checked by TCP connect).")
@click.option("--health-interval-s", type=FiniteFloatRange(0.1, 3600), default=None,
              help="Dynamic mode: seconds between health checks of the local app (default 5).")
@click.option("--instance-id", default=None,
              help="Dynamic mode: this replica's name in the registry (default "
                   "SERVICE-HOSTNAME-PID).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Dynamic mode: a label of this instance, e.g. version=v2 (repeatable).")
@click.option("--report-interval-s", type=FiniteFloatRange(0.05, 3600), default=None,
              help="Dynamic mode: seconds between state reports to the control plane "
                   "(default 5).")
@click.option("--max-backoff-s", type=FiniteFloatRange(0.05, 3600), default=None,
              help="Dynamic mode: the longest wait between attempts to reach the control "
                   "plane: discovery stream, renewals, joining (default 5).")
@click.option("--inbound-port", type=click.IntRange(0, 65535), default=None,
              help="Override the inbound (mTLS) port; 0 = any free port.")
@click.option("--outbound-port", type=click.IntRange(0, 65535), default=None,
              help="Override the outbound (h2c, loopback) port; 0 = any free port.")
@click.option("--admin-port", type=click.IntRange(0, 65535), default=None,
              help="Override the admin HTTP port; 0 = any free port.")
@click.option("--drain-timeout-s", type=FiniteFloatRange(0, 3600), default=10.0, show_default=True,
              help="On SIGTERM, how long calls in flight may take to finish.")
@click.option("--ewma-decay-s", type=FiniteFloatRange(min=0, min_open=True),
              default=DECAY_S, show_default=True, metavar="SECONDS",
              help="Time constant of the peak-EWMA balancer's latency estimate: how fast an "
                   "endpoint's estimate decays between answers (seconds, > 0).")
@click.option("--cert-poll-s", type=FiniteFloatRange(0, 3600), default=2.0, show_default=True,
              help="How often to look for new certificate files (0 = only on SIGHUP).")
@click.option("--access-log", default=None, type=click.Path(dir_okay=False), metavar="PATH",
              help="Append one JSON line per ended call to PATH (default: no access log).")
@click.option("--trace-sample-rate", type=FiniteFloatRange(0, 1), default=0.1,
              show_default=True,
              help="Share of new traces (calls that bring no valid traceparent) that get "
                   "spans; a caller's traceparent decides for its own calls.")
@click.option("--otlp-endpoint", default=None, metavar="HOST:PORT|http://HOST:PORT",
              help="Export spans over OTLP/gRPC: HOST:PORT with mTLS (the sidecar's "
                   "certificate), http://HOST:PORT in plaintext (Jaeger, Tempo). Default: "
                   "dynamic mode, the control plane's receiver; standalone, none (no spans).")
@click.option("--trace-export-delay-ms", type=FiniteFloatRange(1, 60000), default=1000.0,
              show_default=True,
              help="The longest a finished span waits before its batch is exported (ms).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
def cli(config_path: str | None, service: str | None, app: str | None, token: str | None,
        token_file: str | None, control_plane: str | None, bootstrap_address: str | None,
        trust_domain: str | None, health_check: str | None, health_interval_s: float | None,
        instance_id: str | None, labels: tuple[str, ...], report_interval_s: float | None,
        max_backoff_s: float | None, inbound_port: int | None, outbound_port: int | None,
        admin_port: int | None,
        drain_timeout_s: float, ewma_decay_s: float, cert_poll_s: float,
        access_log: str | None,
        trace_sample_rate: float, otlp_endpoint: str | None, trace_export_delay_ms: float,
        log_level: str) -> int:
    """Run a mesh sidecar: an HTTP/2 frame relay with mutual TLS."""
    dynamic_flags = {"--service": service, "--app": app, "--control-plane": control_plane,
                     "--bootstrap-address": bootstrap_address, "--trust-domain": trust_domain,
                     "--health-check": health_check, "--health-interval-s": health_interval_s,
                     "--instance-id": instance_id, "--label": labels or None,
                     "--report-interval-s": report_interval_s, "--max-backoff-s": max_backoff_s}
    dynamic = token is not None or token_file is not None
    if not dynamic:
        if config_path is None:
            raise UsageError("give --config FILE (standalone mode) or --service NAME with "
                             "--token/--token-file (dynamic mode)")
        given = [flag for flag, value in dynamic_flags.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only with --token or --token-file "
                             "(dynamic mode); standalone mode takes everything from --config")
    elif service is None:
        raise UsageError("--service NAME is required with --token/--token-file")
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ports = {"inbound": inbound_port, "outbound": outbound_port, "admin": admin_port}
    if access_log is not None:
        check_writable(access_log, "--access-log")
    if otlp_endpoint is not None:
        check_otlp_endpoint(otlp_endpoint)
    tracing = TracingOptions(sample_rate=trace_sample_rate, otlp_endpoint=otlp_endpoint,
                             export_delay_ms=trace_export_delay_ms, instance_id=instance_id)
    if not dynamic:
        assert config_path is not None
        boot = load_config(config_path)
        tune_malloc()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_serve(boot, ports, drain_timeout_s, cert_poll_s,
                                     access_log=access_log, tracing=tracing,
                                     ewma_decay_s=ewma_decay_s))

    from mesh_common.jointoken import TokenError, parse_token

    api_addresses: list[str] = []
    if control_plane is not None:
        api_addresses = parse_control_planes(control_plane)
    elif os.environ.get("MESH_CONTROL_PLANE"):  # dynamic mode only: standalone ignores it
        api_addresses = parse_control_planes(os.environ["MESH_CONTROL_PLANE"],
                                             "MESH_CONTROL_PLANE")
    join_addresses: list[str] = []
    if bootstrap_address is not None:
        join_addresses = parse_control_planes(bootstrap_address, "--bootstrap-address")
    label_map = parse_labels(labels)
    if instance_id is not None:
        check_instance_id(instance_id)
    try:
        tok = parse_token(_read_token(token, token_file))
    except TokenError as exc:
        raise UsageError(f"--token: {exc}") from None
    assert service is not None
    boot = dynamic_bootstrap(service, trust_domain or "mesh.local", app, config_path)
    tune_malloc()
    options = DynamicOptions(token=tok, join_addresses=tuple(join_addresses),
                             api_addresses=tuple(api_addresses),
                             health_check=health_check or "grpc",
                             health_interval_s=health_interval_s or 5.0,
                             instance_id=instance_id, labels=label_map,
                             report_interval_s=report_interval_s or 5.0,
                             max_backoff_s=max_backoff_s or 5.0)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve_dynamic(boot, options, ports, drain_timeout_s, cert_poll_s,
                                         access_log=access_log, tracing=tracing,
                                         ewma_decay_s=ewma_decay_s))


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
    except ConfigError as exc:
        click.echo(f"{PROG}: config error: {exc}", err=True)
        sys.exit(2)
    except JoinFailed as exc:
        click.echo(f"{PROG}: error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"{PROG}: error: {exc}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
