"""Every argparse ``python -m`` entry point answers a bad argument with one line on stderr,
``python -m <module>: error: <what>``, and exit 2 (not argparse's usage block): an unknown
flag, a value that is not a number, and nan/±inf for a float flag.

No test here can start anything: every command line carries a flag no parser knows
(``GUARD``), so even a value that got through would still be refused by argparse before any
server, load generator or benchmark starts."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mesh_common.cli_args import OneLineArgumentParser
from tests.support.sidecar import REPO_ROOT

GUARD = "--no-such-flag"

# name: (module, the arguments a parser needs before any other; the error names its prog)
ENTRY_POINTS: dict[str, tuple[str, list[str]]] = {
    "loadgen": ("demo_services.loadgen", ["--rps", "1"]),
    "check": ("demo_services.check", []),
    "gateway serve": ("demo_services.gateway", ["serve"]),
    "gateway token": ("demo_services.gateway", ["token", "alice"]),
    "bench": ("bench", []),
    "bench.ab": ("bench.ab", [".", "."]),
    "bench.backend": ("bench.backend", []),
    "bench.cold": ("bench.cold", []),
    "bench.cp_scale": ("bench.cp_scale", []),
    "bench.cp_sim": ("bench.cp_sim", []),
    "bench.floor": ("bench.floor", []),
    "bench.pipe": ("bench.pipe", ["--listen", "0", "--upstream", "127.0.0.1:9"]),
    "bench.registrar": ("bench.registrar", ["--tokens", "tokens.json", "--per-service", "1"]),
    "bench.saga": ("bench.saga", []),
    "echo_server": ("tests.support.echo_server", ["--server-id", "echo-1"]),
    "consul_standin": ("tests.support.consul_standin", []),
}

# The source file of each entry point's parser.
PARSER_FILES = {
    "demo_services/loadgen/__main__.py": "loadgen",
    "demo_services/check.py": "check",
    "demo_services/gateway/__main__.py": "gateway serve",
    "demo_services/gateway/auth.py": "gateway token",
    "bench/__main__.py": "bench",
    "bench/ab.py": "bench.ab",
    "bench/backend.py": "bench.backend",
    "bench/cold.py": "bench.cold",
    "bench/cp_scale.py": "bench.cp_scale",
    "bench/cp_sim.py": "bench.cp_sim",
    "bench/floor.py": "bench.floor",
    "bench/pipe.py": "bench.pipe",
    "bench/registrar.py": "bench.registrar",
    "bench/saga.py": "bench.saga",
    "tests/support/echo_server.py": "echo_server",
    "tests/support/consul_standin.py": "consul_standin",
}
NOT_CHECKED: set[str] = set()
ENTRY_POINT_DIRS = ("demo_services", "bench", "chaos", "tests/support", "scripts")

# (entry point, flag, value): argparse must refuse the value, naming the flag
BAD_VALUES = [
    ("loadgen", "--rps", "abc"),
    ("loadgen", "--rps", "nan"),
    ("loadgen", "--duration", "inf"),
    ("loadgen", "--deadline-s", "-inf"),
    ("loadgen", "--max-in-flight", "abc"),
    ("check", "--wait", "abc"),
    ("check", "--wait", "nan"),
    ("gateway serve", "--reload-interval-s", "abc"),
    ("gateway serve", "--reload-interval-s", "nan"),
    ("gateway token", "--ttl", "abc"),
    ("gateway token", "--ttl", "nan"),
    ("bench.ab", "--latency-s", "nan"),
    ("bench.ab", "--rounds", "abc"),
    ("bench.backend", "--port", "abc"),
    ("bench.cold", "--calls", "abc"),
    ("bench.cp_scale", "--sidecars", "abc"),
    ("bench.cp_sim", "--loop", "abc"),
    ("bench.floor", "--rate", "abc"),
    ("bench.floor", "--seconds", "abc"),
    ("bench.floor", "--seconds", "nan"),
    ("bench.floor", "--seconds", "inf"),
    ("bench.pipe", "--listen", "abc"),
    ("bench.registrar", "--ready-timeout-s", "abc"),
    ("bench.registrar", "--ready-timeout-s", "nan"),
    ("bench.saga", "--orders", "abc"),
    ("echo_server", "--port", "abc"),
    ("echo_server", "--fail-rate", "abc"),
    ("echo_server", "--fail-rate", "nan"),
    ("consul_standin", "--listen", "127.0.0.1:abc"),
]


def _one_error_line(name: str, args: list[str], tmp_path: Path) -> str:
    """Run entry point ``name`` with ``args`` after its needed arguments; it must exit 2 with
    nothing on stdout and one line on stderr, ``python -m <module>...: error: ...``, which is
    returned."""
    module, needed = ENTRY_POINTS[name]
    env = {**os.environ, "MESH_DEMO_DIR": str(tmp_path / "demo")}
    proc = subprocess.run([sys.executable, "-m", module, *needed, *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=30)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == "", proc.stdout
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"python -m {module}") and ": error: " in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_an_unknown_flag_gets_one_line_and_exit_2(name: str, tmp_path: Path) -> None:
    line = _one_error_line(name, [GUARD], tmp_path)
    assert line.endswith(f"error: unrecognized arguments: {GUARD}"), line


@pytest.mark.parametrize("name, flag, value", BAD_VALUES,
                         ids=[f"{n} {f}={v}" for n, f, v in BAD_VALUES])
def test_a_bad_value_gets_one_line_naming_the_flag_and_exit_2(name: str, flag: str, value: str,
                                                               tmp_path: Path) -> None:
    # FLAG=VALUE: argparse takes a separate "-inf" for an option
    line = _one_error_line(name, [f"{flag}={value}", GUARD], tmp_path)
    assert f"error: argument {flag}: " in line, line
    if value in ("nan", "inf", "-inf"):
        assert "not a finite number" in line, line


def test_every_argparse_entry_point_uses_the_one_line_parser_and_is_checked_here() -> None:
    found: dict[str, list[str]] = {}
    for top in ENTRY_POINT_DIRS:
        for path in sorted((REPO_ROOT / top).rglob("*.py")):
            rel = path.relative_to(REPO_ROOT).as_posix()
            calls = re.findall(r"\b(\w*ArgumentParser)\(", path.read_text())
            if calls and rel not in NOT_CHECKED:
                found[rel] = calls
    assert {rel: calls for rel, calls in found.items()
            if set(calls) != {"OneLineArgumentParser"}} == {}
    assert set(found) == set(PARSER_FILES)
    assert set(PARSER_FILES.values()) == set(ENTRY_POINTS)


# ------------------------------------------------------------------ the shared parser
def _parser(cls: type[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = cls(prog="tool", description="A tool.")
    p.add_argument("--count", type=int, default=1, help="how many")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve it")
    serve.add_argument("--rate", type=float, help="per second")
    return p


@pytest.mark.parametrize("argv, expected", [
    (["serve", "--bogus"], "tool: error: unrecognized arguments: --bogus"),
    (["serve", "--rate", "abc"], "tool serve: error: argument --rate: invalid float value: 'abc'"),
    (["--count", "x", "serve"], "tool: error: argument --count: invalid int value: 'x'"),
    ([], "tool: error: the following arguments are required: command"),
])
def test_the_parser_and_its_subcommands_print_one_line_and_exit_2(
        capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser(OneLineArgumentParser).parse_args(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err == expected + "\n"


def test_a_scripts_own_error_is_one_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser(OneLineArgumentParser).error("--rate must be > 0\n(it was -1)")
    assert exc.value.code == 2
    assert capsys.readouterr().err == "tool: error: --rate must be > 0 (it was -1)\n"


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"]])
def test_help_is_argparses(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    outputs = []
    for cls in (argparse.ArgumentParser, OneLineArgumentParser):
        with pytest.raises(SystemExit) as exc:
            _parser(cls).parse_args(argv)
        assert exc.value.code == 0
        outputs.append(capsys.readouterr())
    assert outputs[0] == outputs[1] and "usage: tool" in outputs[1].out


@pytest.mark.parametrize("argv, expected", [
    ([], "gateway: a command is needed (serve, token; --help for more)"),
    (["bogus"], "gateway: unknown command 'bogus' (serve, token)"),
])
def test_the_gateway_without_a_known_command_says_so_in_one_line(
        capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    from demo_services.gateway.__main__ import main
    assert main(argv) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == expected + "\n"
