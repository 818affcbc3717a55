"""``mesh-sidecar``: run one sidecar (standalone mode: ``--config FILE``)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import click
import uvloop
import yaml

from mesh_common.bootstrap import Bootstrap, ConfigError, parse_bootstrap

from .malloc import tune_malloc
from .process import Sidecar

PROG = "mesh-sidecar"


def load_config(path: str) -> Bootstrap:
    """Read and validate the standalone config; raises ConfigError with the file named."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    try:
        return parse_bootstrap(doc)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


async def _serve(boot: Bootstrap, ports: dict[str, int | None], drain_timeout_s: float,
                 cert_poll_s: float) -> int:
    sidecar = Sidecar(boot, drain_timeout_s=drain_timeout_s, cert_poll_s=cert_poll_s)
    bound = await sidecar.start(inbound_port=ports["inbound"], outbound_port=ports["outbound"],
                                admin_port=ports["admin"])
    sys.stdout.write(json.dumps({"ready": bound}) + "\n")
    sys.stdout.flush()
    logging.getLogger("mesh.sidecar").info("%s serving %s as %s", PROG, bound, boot.spiffe_id)
    await sidecar.wait_stopped()
    return 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Standalone config (YAML): service, tls, inbound, outbound, clusters, limits.")
@click.option("--inbound-port", type=click.IntRange(0, 65535), default=None,
              help="Override the inbound (mTLS) port; 0 = any free port.")
@click.option("--outbound-port", type=click.IntRange(0, 65535), default=None,
              help="Override the outbound (h2c, loopback) port; 0 = any free port.")
@click.option("--admin-port", type=click.IntRange(0, 65535), default=None,
              help="Override the admin HTTP port; 0 = any free port.")
@click.option("--drain-timeout-s", type=click.FloatRange(0, 3600), default=10.0, show_default=True,
              help="On SIGTERM, how long calls in flight may take to finish.")
@click.option("--cert-poll-s", type=click.FloatRange(0, 3600), default=2.0, show_default=True,
              help="How often to look for new certificate files (0 = only on SIGHUP).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
def cli(config_path: str, inbound_port: int | None, outbound_port: int | None,
        admin_port: int | None, drain_timeout_s: float, cert_poll_s: float, log_level: str) -> int:
    """Run a mesh sidecar: an HTTP/2 frame relay with mutual TLS."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    boot = load_config(config_path)
    tune_malloc()
    ports = {"inbound": inbound_port, "outbound": outbound_port, "admin": admin_port}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(boot, ports, drain_timeout_s, cert_poll_s))


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
    except OSError as exc:
        click.echo(f"{PROG}: error: {exc}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
