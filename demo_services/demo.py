"""The demo launcher: ``python -m demo_services.demo up|down|run|status``.

    up      start the control plane, two replicas each of inventory, payment and order with
            their sidecars, and the load generator; return once every sidecar is SYNCED and
            holds both replicas of each service (processes outlive it; state in
            <MESH_DEMO_DIR>/state.json, logs in <MESH_DEMO_DIR>/logs/)
    down    stop every process of state.json (SIGTERM, then SIGKILL), remove it; safe twice
    run     up, then a live status panel every second; Ctrl-C or SIGTERM stops everything
    status  the processes of state.json and whether each still runs

Environment (see demo_services.launcher.settings): MESH_DEMO_DIR (.mesh), MESH_CERTS_DIR
(certs), MESH_CONTROL_PLANE (127.0.0.1:15010), MESH_DEMO_BOOTSTRAP (127.0.0.1:15011),
MESH_DEMO_RPS (20), MESH_DEMO_LEASE_S (5), MESH_DEMO_REPORT_INTERVAL_S (2),
MESH_DEMO_HEALTH_INTERVAL_S (1), MESH_DEMO_GRACE_PERIOD_S (10), MESH_DEMO_READY_TIMEOUT_S
(60), MESH_DEMO_STOP_TIMEOUT_S (10), MESH_DEMO_DRAIN_TIMEOUT_S (5), MESH_DEMO_EWMA_DECAY_S
(10), MESH_DEMO_ADMIN_HTTP (127.0.0.1:15014), MESH_DEMO_OTLP (127.0.0.1:15012),
MESH_DEMO_TRACE_SAMPLE_RATE (1.0), MESH_DEMO_REPORT_WINDOW_S (60), MESH_DEMO_GATEWAY
(127.0.0.1:8080), MESH_DEMO_VIA_GATEWAY (unset: the load speaks gRPC; 1: it goes through
the gateway).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import click

from demo_services.launcher import procs
from demo_services.launcher.panel import StatusPanel, hints
from demo_services.launcher.settings import Settings, SettingsError, from_env
from demo_services.launcher.state import StateError, load
from demo_services.launcher.up import AlreadyRunning, bring_down, bring_up

PROG = "demo"


def _say(line: str) -> None:
    click.echo(f"{PROG}: {line}")


def _fail(line: str, code: int = 1) -> None:
    click.echo(f"{PROG}: {line}", err=True)
    sys.exit(code)


def _settings() -> Settings:
    try:
        return from_env()
    except SettingsError as exc:
        _fail(f"error: {exc}", 2)
        raise AssertionError("unreachable") from None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@click.group()
def cli() -> None:
    """Run the demo mesh (see the module doc)."""


@cli.command()
def up() -> None:
    """Start the demo in the background; return once it is ready."""
    settings = _settings()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        bring_up(settings, _say)
    except AlreadyRunning as exc:
        _fail(str(exc))
    except procs.LaunchError as exc:
        _fail(f"error: {exc}")
    except KeyboardInterrupt:
        _fail("interrupted; stopped what was started")
    click.echo(f"{PROG}: from here: {hints(settings)[0]}")
    click.echo(f"{PROG}: stop it with 'make demo-down' (python -m demo_services.demo down)")


@cli.command()
def down() -> None:
    """Stop the demo started by up (safe to run twice)."""
    settings = _settings()
    _ignore_interrupts()
    for note in bring_down(settings, _say):
        click.echo(f"{PROG}: {note}", err=True)


@cli.command()
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def status(output: str) -> None:
    """The processes of state.json and whether each runs (exit 1 if any does not)."""
    settings = _settings()
    try:
        st = load(settings.state_path)
    except StateError as exc:
        _fail(str(exc))
        return
    rows = [{**p.__dict__, "alive": procs.is_ours(p)} for p in st.processes]
    if output == "json":
        click.echo(json.dumps({**st.to_doc(), "processes": rows}, indent=2))
    else:
        click.echo(f"{'ROLE':<14}{'INSTANCE':<12}{'PID':>8}  {'STATE':<8}ADDRESSES")
        for r in rows:
            addrs = " ".join(f"{k}={r[k]}" for k in ("address", "control", "inbound",
                                                     "outbound", "admin") if r[k])
            click.echo(f"{r['role']:<14}{r['instance'] or '-':<12}{r['pid']:>8}  "
                       f"{'running' if r['alive'] else 'exited':<8}{addrs}")
    if not all(r["alive"] for r in rows) or not st.complete:
        sys.exit(1)


@cli.command()
def run() -> None:
    """up, then a live status panel every second; Ctrl-C (or SIGTERM) stops everything."""
    from rich.console import Console
    from rich.live import Live

    settings = _settings()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)   # even if started with SIGINT ignored
    console = Console()
    children: dict[int, Any] = {}
    try:
        started = bring_up(settings, lambda line: console.print(f"{PROG}: {line}"))
        children = started.children
        panel = StatusPanel(settings, started.state)
        try:
            with Live(panel.render(), console=console, refresh_per_second=4,
                      screen=False) as live:
                while True:
                    time.sleep(1.0)
                    live.update(panel.render())
        finally:
            panel.close()
    except AlreadyRunning as exc:
        _fail(str(exc))
    except procs.LaunchError as exc:
        _fail(f"error: {exc}")
    except KeyboardInterrupt:
        pass
    _ignore_interrupts()
    console.print(f"\n{PROG}: stopping everything")
    for note in bring_down(settings, lambda line: console.print(f"{PROG}: {line}"), children):
        console.print(f"{PROG}: {note}")


def main() -> None:
    cli(prog_name=f"python -m demo_services.{PROG}")


if __name__ == "__main__":
    main()
