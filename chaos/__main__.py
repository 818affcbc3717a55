"""``python -m chaos SCENARIO|all [--short] [--seed N] [--report FILE] [--start-demo]``.

Runs against the demo of ``$MESH_DEMO_DIR/state.json`` (``.mesh``), found with the same
environment as ``make demo``. Prints a timeline (what it broke, what the mesh did, what it
measured), then audits the saga's invariants (``demo_services.check``). Exit 0 when every
expectation and invariant holds, 1 when one fails, 2 when it cannot run (no demo, bad
argument). ``--start-demo`` brings the demo up when none runs and takes down what it started.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import click

from chaos import scenarios
from chaos.mesh import ChaosError, Mesh
from chaos.timeline import Timeline
from demo_services.launcher import up as launcher
from demo_services.launcher.settings import Settings, SettingsError, from_env

PROG = "chaos"


def run_one(settings: Settings, name: str, short: bool, seed: int,
            audit_wait_s: float = 30.0) -> Timeline:
    """Run scenario ``name`` against the demo and audit the invariants afterwards."""
    module = scenarios.load(name)
    tl = Timeline(name, seed=seed, short=short)
    tl.say(f"scenario {name}{' (short)' if short else ''}, seed {seed}")
    tl.say(f"expectation: {module.EXPECTATION}")
    mesh = Mesh(settings)
    try:
        opts = scenarios.Options(short=short, seed=seed, rng=random.Random(seed))
        try:
            module.run(mesh, tl, opts)
        except ChaosError as exc:
            tl.expect("the scenario ran to its end", False, str(exc))
        mesh.reload()
        tl.say("auditing the saga's invariants (load paused while it looks)")
        for inv in mesh.audit(audit_wait_s, say=tl.say):
            tl.invariant(inv.name, inv.ok)
    finally:
        mesh.close()
    tl.end()
    tl.say(f"scenario {name}: {'PASSED' if tl.passed else 'FAILED'} in {tl.t:.1f}s")
    return tl


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("scenario", type=click.Choice([*scenarios.SCENARIOS, "all"]))
@click.option("--short", is_flag=True, default=False,
              help="A few seconds of load per phase (what the tests run).")
@click.option("--seed", type=int, default=None,
              help="Seed of the random choices (default: from the clock; printed).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write the report as JSON to this file.")
@click.option("--start-demo", is_flag=True, default=False,
              help="Bring the demo up first when none runs, and down at the end.")
def cli(scenario: str, short: bool, seed: int | None, report_path: str | None,
        start_demo: bool) -> int:
    """Break the running demo mesh on purpose (SCENARIO, or all of the standard set) and
    check what must still hold."""
    try:
        settings = from_env()
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    seed = seed if seed is not None else int(time.time()) % 100_000
    started = None
    if launcher.running(settings) is None:
        if not start_demo:
            raise ChaosError(f"no demo runs under {settings.dir}: start it with 'make demo-up' "
                             f"(or pass --start-demo)")
        click.echo(f"{PROG}: starting the demo")
        started = launcher.bring_up(settings, lambda line: click.echo(f"{PROG}: {line}"))
    try:
        names = list(scenarios.STANDARD) if scenario == "all" else [scenario]
        timelines = [run_one(settings, n, short, seed + i) for i, n in enumerate(names)]
    finally:
        if started is not None:
            click.echo(f"{PROG}: stopping the demo it started")
            launcher.bring_down(settings, lambda line: click.echo(f"{PROG}: {line}"),
                                started.children)
    passed = all(t.passed for t in timelines)
    if report_path:
        doc: dict[str, Any] = (timelines[0].report() if len(timelines) == 1 else
                               {"scenario": "all", "passed": passed,
                                "scenarios": [t.report() for t in timelines]})
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(doc, indent=2) + "\n")
    if len(timelines) > 1:
        for t in timelines:
            click.echo(f"{PROG}: {t.scenario:<20} {'PASSED' if t.passed else 'FAILED'}")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> None:
    """Console entry point: errors are one line on stderr and a non-zero exit."""
    try:
        code = cli.main(args=argv, prog_name=f"python -m {PROG}", standalone_mode=False)
    except click.ClickException as exc:
        click.echo(f"{PROG}: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except (ChaosError, OSError) as exc:
        click.echo(f"{PROG}: error: {exc}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
