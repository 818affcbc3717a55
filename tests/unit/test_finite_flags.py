"""Float flags and numeric settings refuse nan and ±inf: every console script's and ``python -m``
entry point's float option, one line naming the flag and exit 2 (argparse ones too, through
``mesh_common.cli_args.OneLineArgumentParser``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from typing import Any

import click
import pytest

from chaos.__main__ import cli as chaos_cli
from control_plane import main as control_plane_main
from control_plane import meshctl
from demo_services import check, demo
from demo_services.gateway import __main__ as gateway_main
from demo_services.inventory import __main__ as inventory_main
from demo_services.loadgen import __main__ as loadgen_main
from demo_services.order import __main__ as order_main
from demo_services.payment import __main__ as payment_main
from mesh_common.numbers import FiniteFloatRange, finite_arg, finite_float
from sidecar import main as sidecar_main

NOT_FINITE = ("nan", "inf", "-inf", "NaN", "Infinity")

# (name, main(argv), the click command tree, argv before the command path)
CLICK_ENTRY_POINTS: list[tuple[str, Callable[[list[str]], None], click.Command, list[str]]] = [
    ("mesh-sidecar", sidecar_main.main, sidecar_main.cli, []),
    ("mesh-control-plane", control_plane_main.main, control_plane_main.cli, []),
    ("meshctl", meshctl.main, meshctl.cli, ["--certs-dir", "/nonexistent"]),
    ("order", order_main.main, order_main.cli, []),
    ("payment", payment_main.main, payment_main.cli, []),
    ("inventory", inventory_main.main, inventory_main.cli, []),
]
OTHER_CLICK_COMMANDS = [chaos_cli, demo.cli]


def options(cmd: click.Command, path: tuple[str, ...] = ()
            ) -> Iterator[tuple[tuple[str, ...], click.Command, click.Option]]:
    """Every option of ``cmd`` and its subcommands, with the subcommand path to it and the
    (sub)command that owns it."""
    for param in cmd.params:
        if isinstance(param, click.Option):
            yield path, cmd, param
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from options(sub, (*path, name))


def float_flags() -> Iterator[Any]:
    for name, main, cmd, prefix in CLICK_ENTRY_POINTS:
        for path, owner, opt in options(cmd):
            if isinstance(opt.type, click.types.FloatParamType):
                flag = max(opt.opts, key=len)
                yield pytest.param(main, owner, [*prefix, *path], flag,
                                   id=f"{name}{''.join(' ' + p for p in path)} {flag}")


def must_not_run(*args: Any, **kwargs: Any) -> None:
    """Stands in for a command's body: a value that got through would start a control plane
    or a sidecar for real (BaseException: past the entry points' ``except Exception``)."""
    pytest.fail(f"the command ran with {kwargs}")


FLOAT_FLAGS = list(float_flags())


def test_every_float_option_of_every_entry_point_is_a_finite_float_range() -> None:
    commands = [cmd for _, _, cmd, _ in CLICK_ENTRY_POINTS] + OTHER_CLICK_COMMANDS
    plain = [f"{cmd.name}{''.join(' ' + p for p in path)} {opt.opts}"
             for cmd in commands for path, _, opt in options(cmd)
             if isinstance(opt.type, click.types.FloatParamType)
             and not isinstance(opt.type, FiniteFloatRange)]
    assert plain == []
    assert len(FLOAT_FLAGS) >= 26  # 8 sidecar, 11 control plane, 4 meshctl, 3 order


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("main, owner, path, flag", FLOAT_FLAGS)
def test_a_float_flag_refuses_nan_and_inf_in_one_line_with_exit_2(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        main: Callable[[list[str]], None], owner: click.Command, path: list[str], flag: str,
        bad: str) -> None:
    monkeypatch.setattr(owner, "callback", must_not_run)
    with pytest.raises(SystemExit) as exc:
        main([*path, flag, bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "not a finite number" in err[0], err


def _argparse_error(capsys: pytest.CaptureFixture[str], call: Callable[[], Any]) -> str:
    """Run ``call``, which must exit 2 through argparse; returns its one error line."""
    with pytest.raises(SystemExit) as exc:
        call()
    assert exc.value.code == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and ": error: " in errors[0], errors
    return errors[0]


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("before, flag", [([], "--rps"), (["--rps", "1"], "--duration"),
                                          (["--rps", "1"], "--deadline-s")])
def test_loadgen_refuses_nan_and_inf(capsys: pytest.CaptureFixture[str], before: list[str],
                                     flag: str, bad: str) -> None:
    # FLAG=VALUE: argparse takes a separate "-inf" for an option
    line = _argparse_error(capsys, lambda: loadgen_main.parse_args([*before, f"{flag}={bad}"]))
    assert f"argument {flag}: not a finite number" in line, line


@pytest.mark.parametrize("argv, flag", [(["--deadline-s", "0"], "--deadline-s"),
                                        (["--rps", "-1"], "--rps")])
def test_loadgen_keeps_its_bounds(capsys: pytest.CaptureFixture[str], argv: list[str],
                                  flag: str) -> None:
    line = _argparse_error(capsys, lambda: loadgen_main.parse_args(["--rps", "1", *argv]))
    assert flag in line, line


@pytest.mark.parametrize("bad", ["nan", "inf", "-1"])
def test_check_wait_refuses_nan_inf_and_negatives(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  bad: str) -> None:
    monkeypatch.setattr(check, "run", must_not_run)  # it would audit a running demo
    line = _argparse_error(capsys, lambda: check.main([f"--wait={bad}"]))
    assert "--wait" in line, line


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_gateway_reload_interval_refuses_nan_and_inf(capsys: pytest.CaptureFixture[str],
                                                     bad: str) -> None:
    line = _argparse_error(capsys, lambda: gateway_main.parse_serve(
        ["--reload-interval-s", bad]))
    assert "argument --reload-interval-s: not a finite number" in line, line


# ------------------------------------------------------------------ the shared mechanism
@pytest.mark.parametrize("bad", NOT_FINITE)
def test_finite_float_refuses_nan_and_inf_by_name(bad: str) -> None:
    with pytest.raises(ValueError, match=f"not a finite number: '{bad}'"):
        finite_float(bad)
    with pytest.raises(ValueError, match="not a finite number"):
        finite_float(float(bad))
    with pytest.raises(argparse.ArgumentTypeError, match="not a finite number"):
        finite_arg(bad)
    with pytest.raises(click.BadParameter, match="not a finite number"):
        FiniteFloatRange(min=0).convert(bad, None, None)


def test_finite_float_range_is_a_float_range_otherwise() -> None:
    assert finite_float(" 2.5 ") == 2.5 and finite_arg("1e3") == 1000.0
    with pytest.raises(ValueError, match="not a number: 'soon'"):
        finite_float("soon")
    r = FiniteFloatRange(0, 10, min_open=True)
    assert r.convert("10", None, None) == 10.0
    for bad, why in (("0", "not in the range 0<x<=10"), ("11", "not in the range"),
                     ("x", "not a number")):
        with pytest.raises(click.BadParameter, match=why):
            r.convert(bad, None, None)
