"""The argparse parser of every ``python -m`` entry point that is not a click command.

A bad command-line argument gets one clear line and a non-zero exit, the way click's usage
errors already do: argparse's own ``error`` prints the whole usage block before its error
line. ``--help`` is argparse's, unchanged; float flags take ``mesh_common.numbers.finite_arg``.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors (unknown flag, bad value, missing
    argument, and the script's own ``parser.error(...)``) print exactly one line,
    ``<prog>: error: <message>``, to stderr and exit 2. Subparsers made by
    ``add_subparsers`` are of this class too (argparse's default ``parser_class``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.splitlines())}\n")
