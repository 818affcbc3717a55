"""The command line of a participant service (payment, inventory):

    python -m demo_services.<name> serve --instance ID --db PATH [--listen HOST:PORT]
        [--control-listen HOST:PORT] [--log-level info]

Prints the ready line (see ``demo_services.common.server``) once serving; SIGTERM/SIGINT stop
it with exit 0. Bad flags: one line on stderr, exit 2; a database or listen failure: one line,
exit 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from .server import ServiceSpec, basic_logging, serve, split_hostport


def address(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """click callback: a HOST:PORT."""
    try:
        split_hostport(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def non_empty(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """click callback: a non-blank string."""
    if not value.strip():
        raise click.BadParameter("must not be empty")
    return value


def participant_cli(name: str, about: str, grpc_service: str,
                    spec: Callable[[str, str], ServiceSpec]) -> click.Group:
    """The click group of service ``name`` (``serve`` runs ``spec(instance, db_path)``)."""

    @click.group(help=about, context_settings={"help_option_names": ["-h", "--help"]})
    def cli() -> None:
        pass

    @cli.command("serve", help=f"Serve {grpc_service} until SIGTERM/SIGINT.")
    @click.option("--instance", required=True, callback=non_empty, help="This replica's id.")
    @click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False),
                  help="The service's SQLite file (shared by its replicas; created and seeded "
                       "on first start).")
    @click.option("--listen", default="127.0.0.1:0", show_default=True, callback=address,
                  help="gRPC listener (h2c, behind the sidecar).")
    @click.option("--control-listen", default="127.0.0.1:0", show_default=True,
                  callback=address, help="HTTP control endpoint (sickness).")
    @click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
                  default="info", show_default=True)
    def serve_cmd(instance: str, db_path: str, listen: str, control_listen: str,
                  log_level: str) -> int:
        basic_logging(log_level)
        return serve(spec(instance, db_path), listen, control_listen)

    return cli


def run(cli: click.Group, prog: str, argv: list[str] | None = None,
        commands: str = "serve") -> None:
    """Console entry: errors are one line on stderr: exit 2 for bad flags, 1 for anything
    else."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        click.echo(f"{prog}: error: missing command ({commands}; see --help)", err=True)
        sys.exit(2)
    try:
        code = cli.main(args=args, prog_name=prog, standalone_mode=False)
    except click.ClickException as exc:
        click.echo(f"{prog}: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except Exception as exc:  # sqlite3.Error, OSError: still one line
        click.echo(f"{prog}: error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
