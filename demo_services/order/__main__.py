"""``python -m demo_services.order``:

- ``serve --instance ID --db PATH --outbound HOST:PORT [--listen HOST:PORT]
  [--control-listen HOST:PORT] [--lease-s 5] [--step-budget-s 10] [--call-timeout-s 2]
  [--direct SERVICE=HOST:PORT[,HOST:PORT...]]... [--log-level info]``: run one order replica
  (the saga orchestrator). Prints the ready line (see ``demo_services.common.server``) once
  serving; SIGTERM/SIGINT stop it with exit 0. ``--direct`` calls that participant
  (inventory, payment) straight at its replicas, without the mesh (round robin, plaintext;
  the saga bench's direct wiring); ``--outbound`` is then needed only for the others.
- ``rebuild --db PATH [--json]``: replay every event into a fresh read model and compare it
  with the live one: exit 0 if equal, 1 with the differences otherwise. Never writes.

Bad flags: one line on stderr, exit 2; a database or listen failure: one line, exit 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from demo_services.common.cli import address as _address
from demo_services.common.cli import non_empty as _non_empty
from demo_services.common.cli import run
from demo_services.common.server import basic_logging, serve
from mesh_common.numbers import FiniteFloatRange

from .events import rebuild_check
from .service import OrderSettings, build_spec

PROG = "python -m demo_services.order"
_POSITIVE = FiniteFloatRange(min=0, min_open=True, max=3600)
PARTICIPANTS = ("inventory", "payment")


def _direct(ctx: click.Context, param: click.Parameter,
            values: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """click callback: ``SERVICE=HOST:PORT[,HOST:PORT...]`` values, one per participant."""
    out: dict[str, tuple[str, ...]] = {}
    for value in values:
        service, sep, addrs = value.partition("=")
        if not sep or service not in PARTICIPANTS:
            raise click.BadParameter(f"expected SERVICE=HOST:PORT[,HOST:PORT...] with SERVICE "
                                     f"one of {', '.join(PARTICIPANTS)}, got {value!r}")
        if service in out:
            raise click.BadParameter(f"{service} given twice")
        out[service] = tuple(a.strip() for a in addrs.split(","))
        for a in out[service]:
            _address(ctx, param, a)
    return tuple(out.items())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """The demo's order service: the saga orchestrator, event-sourced."""


@cli.command("serve")
@click.option("--instance", required=True, callback=_non_empty, help="This replica's id.")
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False),
              help="Order's SQLite file (events, read model, saga log; shared by the "
                   "replicas; created on first start).")
@click.option("--listen", default="127.0.0.1:0", show_default=True, callback=_address,
              help="gRPC listener (h2c, behind the sidecar).")
@click.option("--control-listen", default="127.0.0.1:0", show_default=True,
              callback=_address, help="HTTP control endpoint (sickness, GET /sagas).")
@click.option("--outbound", default=None,
              callback=lambda ctx, param, v: None if v is None else _address(ctx, param, v),
              help="The replica's sidecar outbound port (HOST:PORT) for inventory/payment "
                   "(required unless --direct names both).")
@click.option("--direct", multiple=True, callback=_direct,
              metavar="SERVICE=HOST:PORT[,HOST:PORT...]",
              help="Call this participant straight at its replicas, without the mesh "
                   "(plaintext, round robin); repeat for inventory and payment.")
@click.option("--lease-s", type=_POSITIVE, default=5.0, show_default=True,
              help="Saga lease: an expired one is resumed by any replica.")
@click.option("--step-budget-s", type=_POSITIVE, default=10.0, show_default=True,
              help="How long a forward step may fail transiently before it is compensated.")
@click.option("--call-timeout-s", type=_POSITIVE, default=2.0, show_default=True,
              help="Timeout of each participant call.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"],
                                               case_sensitive=False),
              default="info", show_default=True)
def serve_cmd(instance: str, db_path: str, listen: str, control_listen: str,
              outbound: str | None, direct: tuple[tuple[str, tuple[str, ...]], ...],
              lease_s: float, step_budget_s: float, call_timeout_s: float,
              log_level: str) -> int:
    """Serve order.Order until SIGTERM/SIGINT."""
    if outbound is None and {s for s, _ in direct} != set(PARTICIPANTS):
        raise click.UsageError("--outbound is required unless --direct names both "
                               "inventory and payment")
    basic_logging(log_level)
    settings = OrderSettings(instance=instance, db_path=Path(db_path), outbound=outbound or "",
                             lease_s=lease_s, step_budget_s=step_budget_s,
                             call_timeout_s=call_timeout_s, direct=direct)
    return serve(build_spec(settings), listen, control_listen)


@cli.command("rebuild")
@click.option("--db", "db_path", required=True,
              type=click.Path(exists=True, dir_okay=False), help="Order's SQLite file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def rebuild_cmd(db_path: str, as_json: bool) -> int:
    """Replay the events into a fresh read model; exit 0 iff it equals the live one."""
    report = rebuild_check(db_path)
    if as_json:
        click.echo(json.dumps(report.to_doc()))
    elif report.equal:
        click.echo(f"read model equals a replay of {report.events} events "
                   f"({report.orders} orders)")
    else:
        click.echo(f"read model differs from a replay of {report.events} events "
                   f"({report.orders} orders):")
        for line in report.differences:
            click.echo(f"  {line}")
    return 0 if report.equal else 1


def main(argv: list[str] | None = None) -> None:
    """Errors are one line on stderr: exit 2 for bad flags, 1 for anything else."""
    run(cli, PROG, argv, commands="serve, rebuild")

if __name__ == "__main__":
    main()
